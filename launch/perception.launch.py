"""Launch the facial_perception lifecycle node and bring it to 'active' automatically.

    ros2 launch facial_perception perception.launch.py
        [params_file:=...] [image_topic:=...] [auto_activate:=true] [namespace:=...] [log_level:=info]

The node is a lifecycle node: 'configure' loads the model, 'activate' subscribes to the camera. With
auto_activate (the default) this file sends 'configure' at start-up and 'activate' once the node reports
'inactive', so a plain launch ends with a running node.
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
EXECUTABLE = "perception_node"
NODE_NAME = "facial_perception"


def generate_launch_description() -> launch.LaunchDescription:
    """Declare the arguments, the lifecycle node and the configure -> activate sequence."""
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "perception.yaml")
    params_file = LaunchConfiguration("params_file")
    image_topic = LaunchConfiguration("image_topic")
    auto_activate = LaunchConfiguration("auto_activate")

    node = LifecycleNode(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=NODE_NAME,
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[params_file, {"image_topic": image_topic}],
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
                "params_file", default_value=default_params, description="Parameter file of the node"
            ),
            DeclareLaunchArgument(
                "image_topic", default_value="/camera/image_raw", description="Input image topic"
            ),
            DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node"),
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
