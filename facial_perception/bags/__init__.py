"""ROS 2 bags from datasets, and bag evaluation offline or live."""
