"""Example: a USB camera driver plus the perception node on its images.

    ros2 launch facial_perception camera_perception.launch.py
        [camera:=v4l2_camera|usb_cam] [video_device:=/dev/video0]

The camera driver is `v4l2_camera` (apt: ros-$ROS_DISTRO-v4l2-camera) or `usb_cam`
(apt: ros-$ROS_DISTRO-usb-cam); both publish sensor_msgs/Image on <namespace>/image_raw.
"""

import os

import launch
from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.conditions import LaunchConfigurationEquals
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "facial_perception"
CAMERA_NAMESPACE = "camera"
IMAGE_TOPIC = "/camera/image_raw"


def generate_launch_description() -> launch.LaunchDescription:
    """Start the chosen camera driver and include perception.launch.py on its image topic."""
    share = get_package_share_directory(PACKAGE)
    video_device = LaunchConfiguration("video_device")
    width = LaunchConfiguration("width")
    height = LaunchConfiguration("height")

    v4l2_camera = Node(
        package="v4l2_camera",
        executable="v4l2_camera_node",
        name="camera",
        namespace=CAMERA_NAMESPACE,
        output="screen",
        parameters=[{"video_device": video_device, "image_size": [640, 480], "output_encoding": "rgb8"}],
        condition=LaunchConfigurationEquals("camera", "v4l2_camera"),
    )
    usb_cam = Node(
        package="usb_cam",
        executable="usb_cam_node_exe",
        name="camera",
        namespace=CAMERA_NAMESPACE,
        output="screen",
        parameters=[
            {
                "video_device": video_device,
                "image_width": width,
                "image_height": height,
                "pixel_format": "yuyv2rgb",
                "framerate": 30.0,
            }
        ],
        condition=LaunchConfigurationEquals("camera", "usb_cam"),
    )
    perception = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, "launch", "perception.launch.py")),
        launch_arguments={
            "params_file": LaunchConfiguration("params_file"),
            "image_topic": IMAGE_TOPIC,
        }.items(),
    )

    return launch.LaunchDescription(
        [
            DeclareLaunchArgument(
                "camera",
                default_value="v4l2_camera",
                choices=["v4l2_camera", "usb_cam"],
                description="Camera driver package",
            ),
            DeclareLaunchArgument("video_device", default_value="/dev/video0", description="V4L2 device"),
            DeclareLaunchArgument("width", default_value="640", description="Image width (usb_cam)"),
            DeclareLaunchArgument("height", default_value="480", description="Image height (usb_cam)"),
            DeclareLaunchArgument(
                "params_file",
                default_value=os.path.join(share, "config", "perception.yaml"),
                description="Parameter file of the perception node",
            ),
            v4l2_camera,
            usb_cam,
            perception,
        ]
    )
