"""Republish the perception node's faces on the ROS4HRI (REP-155) topics, /humans/faces/...

    ros2 launch facial_perception hri_bridge.launch.py [faces_topic:=/facial_perception/faces]
        [params_file:=...] [auto_activate:=true] [log_level:=info]

Start it beside perception.launch.py. The bridge is a lifecycle node: with auto_activate (the default)
this file configures it at start-up and activates it once it reports 'inactive'. It needs hri_msgs
(sudo apt install ros-$ROS_DISTRO-hri-msgs); without it, 'configure' fails with a one-line error.
"""

import os

import launch
import launch.events
from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, EmitEvent, RegisterEventHandler
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

PACKAGE = "facial_perception"
EXECUTABLE = "hri_bridge"
NODE_NAME = "hri_bridge"


def generate_launch_description() -> launch.LaunchDescription:
    """Declare the arguments, the bridge lifecycle node and its configure -> activate sequence."""
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "hri_bridge.yaml")
    auto_activate = LaunchConfiguration("auto_activate")

    node = LifecycleNode(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=NODE_NAME,
        namespace="",
        output="screen",
        parameters=[LaunchConfiguration("params_file"), {"faces_topic": LaunchConfiguration("faces_topic")}],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )

    configure = EmitEvent(
        event=ChangeState(
            lifecycle_node_matcher=launch.events.matches_action(node),
            transition_id=Transition.TRANSITION_CONFIGURE,
        ),
        condition=IfCondition(auto_activate),
    )
    activate_when_configured = RegisterEventHandler(
        OnStateTransition(
            target_lifecycle_node=node,
            goal_state="inactive",
            entities=[
                EmitEvent(
                    event=ChangeState(
                        lifecycle_node_matcher=launch.events.matches_action(node),
                        transition_id=Transition.TRANSITION_ACTIVATE,
                    )
                )
            ],
        ),
        condition=IfCondition(auto_activate),
    )

    return launch.LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file", default_value=default_params, description="Parameter file of the bridge"
            ),
            DeclareLaunchArgument(
                "faces_topic",
                default_value="/facial_perception/faces",
                description="FaceArray topic of the perception node",
            ),
            DeclareLaunchArgument(
                "auto_activate",
                default_value="true",
                description="Configure and activate the lifecycle node at start-up",
            ),
            DeclareLaunchArgument("log_level", default_value="info", description="Logging level"),
            activate_when_configured,
            node,
            configure,
        ]
    )
