"""Inference pipeline without ROS: decode -> detect -> track -> batch -> model -> smooth -> identify."""
