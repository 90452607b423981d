"""Static checks of the launch files and parameter files (``launch``/``launch_ros`` are not installable here).

The launch files are parsed with ``ast``: every package, executable, launch file and parameter file they name
must exist in this repository's install rules (CMakeLists.txt) and config/, every launch argument they use
must be declared, the lifecycle node must be configured and then activated, and every module they import must
be a declared dependency in package.xml. The parameter files are loaded with rclpy's own YAML parser and
checked against the parameters the real nodes declare.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy", reason="the ROS wheels are installed by scripts/setup.sh")

from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter, parameter_dict_from_yaml_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAUNCH_DIR = REPO / "launch"
CONFIG_DIR = REPO / "config"
PACKAGE = "facial_perception"
PERCEPTION_NODE = "facial_perception"

# Executables of the camera drivers the example launch file can start (from their packages' install rules).
EXTERNAL_EXECUTABLES = {"v4l2_camera": {"v4l2_camera_node"}, "usb_cam": {"usb_cam_node_exe"}}

# Parameters every rclpy node has; they are not the package's to document.
ROS_BUILTIN_PARAMETERS = {"use_sim_time", "start_type_description_service"}

# The perception node's parameters (issue 3): name -> (ROS type, allowed values or (min, max) or None).
PERCEPTION_PARAMETERS: dict[str, tuple[Parameter.Type, object]] = {
    "image_topic": (Parameter.Type.STRING, None),
    "input_type": (Parameter.Type.STRING, {"raw", "compressed"}),
    "image_reliability": (Parameter.Type.STRING, {"best_effort", "reliable"}),
    "device": (Parameter.Type.STRING, {"auto", "cpu", "cuda"}),
    "half": (Parameter.Type.STRING, {"auto", "true", "false"}),
    "mirror_average": (Parameter.Type.BOOL, None),
    "cpu_threads": (Parameter.Type.INTEGER, None),
    "overlap_stages": (Parameter.Type.BOOL, None),
    "encoder_stage": (Parameter.Type.BOOL, None),
    "max_frames_in_flight": (Parameter.Type.INTEGER, (0, 5)),
    "fuse_columns": (Parameter.Type.BOOL, None),
    "standalone_members": (Parameter.Type.BOOL, None),
    "model_path": (Parameter.Type.STRING, None),
    "detector": (Parameter.Type.STRING, {"blazeface", "blazeface_full", "haar", "auto"}),
    "detection_threshold": (Parameter.Type.DOUBLE, (0.0, 1.0)),
    "detect_every": (Parameter.Type.INTEGER, (1, 30)),
    "max_faces": (Parameter.Type.INTEGER, (1, 64)),
    "min_face_size": (Parameter.Type.INTEGER, (8, 4096)),
    "crop_margin": (Parameter.Type.DOUBLE, (-1.0, 2.0)),
    "identity_every": (Parameter.Type.INTEGER, (1, 30)),
    "standalone_every": (Parameter.Type.INTEGER, (1, 30)),
    "attributes_every": (Parameter.Type.INTEGER, (1, 30)),
    "crop_offset_y": (Parameter.Type.DOUBLE, (-1.0, 1.0)),
    "tracker_iou": (Parameter.Type.DOUBLE, (0.0, 1.0)),
    "track_max_missed": (Parameter.Type.INTEGER, (0, 100)),
    "smoothing": (Parameter.Type.DOUBLE, (0.0, 0.99)),
    "identity_enabled": (Parameter.Type.BOOL, None),
    "gallery_path": (Parameter.Type.STRING, None),
    "identity_threshold": (Parameter.Type.DOUBLE, (0.0, 1.0)),
    "known_identity_threshold": (Parameter.Type.DOUBLE, (0.0, 1.01)),
    "store_face_images": (Parameter.Type.BOOL, None),
    "enrol_frames": (Parameter.Type.INTEGER, (1, 1000)),
    "enrol_timeout": (Parameter.Type.DOUBLE, (0.5, 600.0)),
    "training_epochs": (Parameter.Type.INTEGER, (1, 1000)),
    "publish_debug_image": (Parameter.Type.BOOL, None),
    "diagnostics_period": (Parameter.Type.DOUBLE, (0.1, 60.0)),
    "columns_dir": (Parameter.Type.STRING, None),
    "processing_rate": (Parameter.Type.DOUBLE, (0.0, 1000.0)),
}


# ---------------------------------------------------------------------------------------------------- helpers
def installed_ros_executables() -> list[str]:
    """The lib/facial_perception executables CMakeLists.txt generates and installs."""
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    match = re.search(r"set\(FP_ROS_EXECUTABLES ([\w ]+)\)", cmake)
    assert match, "CMakeLists.txt: set(FP_ROS_EXECUTABLES ...) not found"
    assert re.search(r"install\(PROGRAMS [^)]*DESTINATION lib/\$\{PROJECT_NAME\}\)", cmake)
    return match.group(1).split()


def installed_share_dirs() -> set[str]:
    """Directories CMakeLists.txt installs into share/facial_perception."""
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    dirs: set[str] = set()
    for body in re.findall(r"install\(DIRECTORY ([^)]*?) DESTINATION share/\$\{PROJECT_NAME\}\)", cmake):
        dirs.update(body.split())
    return dirs


class LaunchFile:
    """What a launch file names, collected from its syntax tree (module constants are resolved)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        self.constants = {
            target.id: node.value.value
            for node in self.tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        self.calls = [n for n in ast.walk(self.tree) if isinstance(n, ast.Call)]

    def value(self, node: ast.expr | None) -> object:
        """A literal or a module-level constant; None for anything computed at launch time."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.constants.get(node.id)
        return None

    def calls_to(self, name: str) -> list[ast.Call]:
        def called(call: ast.Call) -> str:
            func = call.func
            if isinstance(func, ast.Name):
                return func.id
            return func.attr if isinstance(func, ast.Attribute) else ""

        return [c for c in self.calls if called(c) == name]

    def keyword(self, call: ast.Call, name: str) -> object:
        return next((self.value(k.value) for k in call.keywords if k.arg == name), None)

    def nodes(self) -> list[tuple[str, object, object]]:
        """(action class, package, executable) of every Node / LifecycleNode action."""
        return [
            (kind, self.keyword(call, "package"), self.keyword(call, "executable"))
            for kind in ("Node", "LifecycleNode")
            for call in self.calls_to(kind)
        ]

    def declared_arguments(self) -> set[str]:
        return {str(self.value(c.args[0])) for c in self.calls_to("DeclareLaunchArgument")}

    def used_arguments(self) -> set[str]:
        return {str(self.value(c.args[0])) for c in self.calls_to("LaunchConfiguration")} | {
            str(self.value(c.args[0])) for c in self.calls_to("LaunchConfigurationEquals")
        }

    def path_joins(self) -> list[list[str]]:
        """The string parts of every os.path.join(...) (the share directory variable is dropped)."""
        return [
            [str(self.value(a)) for a in call.args if isinstance(self.value(a), str)]
            for call in self.calls_to("join")
        ]

    def imported_packages(self) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        return names


def launch_files() -> list[Path]:
    return sorted(LAUNCH_DIR.glob("*.launch.py"))


def package_xml_dependencies() -> set[str]:
    root = ET.parse(REPO / "package.xml").getroot()
    tags = ("depend", "exec_depend", "build_export_depend")
    return {element.text.strip() for tag in tags for element in root.iter(tag) if element.text}


# ---------------------------------------------------------------------------------------------- launch files
def test_expected_launch_files_exist() -> None:
    names = {p.name for p in launch_files()}
    assert {"perception.launch.py", "camera_perception.launch.py"} <= names
    assert "launch" in installed_share_dirs(), "CMakeLists.txt must install launch/ into share/<package>"


@pytest.mark.parametrize("path", launch_files(), ids=lambda p: p.name)
def test_launch_file_structure(path: Path) -> None:
    launch = LaunchFile(path)
    compile(launch.tree, str(path), "exec")
    functions = {n.name for n in launch.tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    assert launch.constants.get("PACKAGE") == PACKAGE
    share_lookups = launch.calls_to("get_package_share_directory")
    assert share_lookups, "the package share directory must be looked up, not hard-coded"
    assert all(launch.value(c.args[0]) == PACKAGE for c in share_lookups)


@pytest.mark.parametrize("path", launch_files(), ids=lambda p: p.name)
def test_launch_file_executables_exist(path: Path) -> None:
    launch = LaunchFile(path)
    ours = set(installed_ros_executables())
    for kind, package, executable in launch.nodes():
        assert isinstance(package, str) and isinstance(executable, str), f"{kind}: package/executable literal"
        if package == PACKAGE:
            assert executable in ours, f"{path.name}: {executable} is not installed by CMakeLists.txt"
        else:
            known = EXTERNAL_EXECUTABLES.get(package, set())
            assert executable in known, f"{path.name}: unknown executable {package}/{executable}"


@pytest.mark.parametrize(
    ("executable", "module"),
    [
        *((name, f"ros/{name}.py") for name in installed_ros_executables()),
        ("facial-perception", "core/cli.py"),
    ],
)
def test_installed_executables_have_a_main(executable: str, module: str) -> None:
    """Each generated wrapper runs facial_perception.<module>:main(); that function must exist."""
    source = REPO / PACKAGE / module
    assert source.is_file(), f"{executable}: {source} is missing"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains, f"{source} defines no top-level main()"
    arguments = mains[0].args
    assert len(arguments.args) - len(arguments.defaults) == 0, "main() must be callable without arguments"


@pytest.mark.parametrize("path", launch_files(), ids=lambda p: p.name)
def test_launch_file_named_files_exist(path: Path) -> None:
    """config/<file> and launch/<file> references point at files that exist and are installed."""
    launch = LaunchFile(path)
    shared = installed_share_dirs()
    referenced = [parts for parts in launch.path_joins() if parts and parts[0] in ("config", "launch")]
    assert referenced, f"{path.name} names no parameter or launch file"
    for parts in referenced:
        assert parts[0] in shared, f"{parts[0]}/ is not installed into share/{PACKAGE}"
        assert (REPO.joinpath(*parts)).is_file(), f"{path.name} names missing file {'/'.join(parts)}"


@pytest.mark.parametrize("path", launch_files(), ids=lambda p: p.name)
def test_launch_arguments_declared(path: Path) -> None:
    launch = LaunchFile(path)
    undeclared = launch.used_arguments() - launch.declared_arguments()
    assert not undeclared, f"{path.name}: undeclared launch arguments {undeclared}"


def test_included_launch_arguments_match() -> None:
    """camera_perception passes only arguments that perception.launch.py declares."""
    outer = LaunchFile(LAUNCH_DIR / "camera_perception.launch.py")
    inner = LaunchFile(LAUNCH_DIR / "perception.launch.py")
    includes = outer.calls_to("IncludeLaunchDescription")
    assert len(includes) == 1
    passed: set[str] = set()
    for keyword in includes[0].keywords:
        if keyword.arg == "launch_arguments":
            mapping = keyword.value.func.value if isinstance(keyword.value, ast.Call) else keyword.value
            assert isinstance(mapping, ast.Dict)
            passed = {str(outer.value(k)) for k in mapping.keys if k is not None}
    assert "image_topic" in passed
    assert passed <= inner.declared_arguments()


@pytest.mark.parametrize(
    ("file", "executable", "node_name"),
    [
        ("perception.launch.py", "perception_node", PERCEPTION_NODE),
        ("hri_bridge.launch.py", "hri_bridge", "hri_bridge"),
    ],
)
def test_lifecycle_launch_files_configure_then_activate(file: str, executable: str, node_name: str) -> None:
    from lifecycle_msgs.msg import Transition

    launch = LaunchFile(LAUNCH_DIR / file)
    assert [(k, p, e) for k, p, e in launch.nodes()] == [("LifecycleNode", PACKAGE, executable)]
    node_call = launch.calls_to("LifecycleNode")[0]
    assert launch.keyword(node_call, "name") == node_name
    transitions = [
        kw.value.attr
        for call in launch.calls_to("ChangeState")
        for kw in call.keywords
        if kw.arg == "transition_id" and isinstance(kw.value, ast.Attribute)
    ]
    assert transitions == ["TRANSITION_CONFIGURE", "TRANSITION_ACTIVATE"]
    assert all(hasattr(Transition, name) for name in transitions)
    handlers = launch.calls_to("OnStateTransition")
    assert len(handlers) == 1 and launch.keyword(handlers[0], "goal_state") == "inactive"
    # the activate event is emitted from the handler that waits for 'inactive'
    inner = ast.walk(handlers[0])
    assert any(isinstance(n, ast.Attribute) and n.attr == "TRANSITION_ACTIVATE" for n in inner), (
        "activation must be triggered by the 'inactive' state transition"
    )


@pytest.mark.parametrize("path", launch_files(), ids=lambda p: p.name)
def test_launch_imports_are_declared_dependencies(path: Path) -> None:
    imported = LaunchFile(path).imported_packages() - set(sys.stdlib_module_names)
    missing = imported - package_xml_dependencies()
    assert not missing, f"{path.name} imports packages package.xml does not declare: {missing}"


# ---------------------------------------------------------------------------------------------- parameters
def _load(path: Path, node: str) -> dict[str, Parameter]:
    params = parameter_dict_from_yaml_file(str(path), use_wildcard=True, target_nodes=[node])
    return {name: Parameter.from_parameter_msg(msg) for name, msg in params.items()}


def test_perception_yaml_has_every_parameter_with_valid_values() -> None:
    params = _load(CONFIG_DIR / "perception.yaml", f"/{PERCEPTION_NODE}")
    assert set(params) == set(PERCEPTION_PARAMETERS)
    for name, (kind, allowed) in PERCEPTION_PARAMETERS.items():
        param = params[name]
        assert param.type_ == kind, f"{name}: {param.type_} in the yaml, the node declares {kind}"
        if isinstance(allowed, set):
            assert param.value in allowed, name
        elif isinstance(allowed, tuple):
            assert allowed[0] <= param.value <= allowed[1], name
    assert params["image_topic"].value == "/camera/image_raw"
    assert params["model_path"].value == ""  # the shipped default model


def test_demo_yaml_consistent() -> None:
    path = CONFIG_DIR / "demo.yaml"
    perception = _load(path, f"/{PERCEPTION_NODE}")
    camera = _load(path, "/demo_camera")
    listener = _load(path, "/demo_listener")
    for name, param in perception.items():
        assert name in PERCEPTION_PARAMETERS, f"demo.yaml: unknown perception parameter {name}"
        assert param.type_ == PERCEPTION_PARAMETERS[name][0], name
    assert perception["image_topic"].value == camera["image_topic"].value == listener["image_topic"].value
    assert listener["faces_topic"].value == f"/{PERCEPTION_NODE}/faces"


def _node_class(module_name: str) -> type[Node]:
    """The rclpy node class a facial_perception.ros module defines (the one its main() runs)."""
    module = importlib.import_module(module_name)
    classes = [
        obj
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Node) and obj.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"{module_name}: expected one Node subclass, found {classes}"
    return classes[0]


@pytest.mark.parametrize(
    ("config", "module", "node_name"),
    [
        ("demo.yaml", "facial_perception.ros.demo_camera", "demo_camera"),
        ("demo.yaml", "facial_perception.ros.demo_listener", "demo_listener"),
        ("demo.yaml", "facial_perception.ros.perception_node", PERCEPTION_NODE),
        ("perception.yaml", "facial_perception.ros.perception_node", PERCEPTION_NODE),
        ("hri_bridge.yaml", "facial_perception.ros.hri_bridge", "hri_bridge"),
    ],
)
def test_parameter_file_matches_node_declarations(config: str, module: str, node_name: str) -> None:
    """Load the parameter file into the real node as `ros2 launch` would: a wrong name would be silently
    ignored by ROS, a wrong type makes the node fail at start-up; both are caught here."""
    path = CONFIG_DIR / config
    expected = _load(path, f"/{node_name}")
    node_class = _node_class(module)
    context = rclpy.Context()
    rclpy.init(args=["--ros-args", "--params-file", str(path)], context=context)
    try:
        node = node_class(context=context)
        try:
            assert node.get_name() == node_name
            undeclared = [name for name in expected if not node.has_parameter(name)]
            assert not undeclared, f"{config} sets parameters {node_name} does not declare: {undeclared}"
            for name, param in expected.items():
                assert node.get_parameter(name).value == param.value, name
            if config == "perception.yaml":
                declared = set(node._parameters) - ROS_BUILTIN_PARAMETERS
                assert declared <= set(expected), f"not in {config}: {declared - set(expected)}"
                for name in declared:  # described, and numbers bounded, for `ros2 param describe`
                    descriptor = node.describe_parameter(name)
                    assert descriptor.description.strip(), f"{name} has no description"
                    if expected[name].type_ in (Parameter.Type.INTEGER, Parameter.Type.DOUBLE):
                        ranges = [*descriptor.integer_range, *descriptor.floating_point_range]
                        assert ranges, f"{name} is declared without a range"
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
