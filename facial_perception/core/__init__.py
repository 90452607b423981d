"""Pure-PyTorch core: models, data, training and evaluation. Never imports ROS."""
