"""Thin ROS 2 layer: lifecycle node, message conversion, services, demo nodes."""
