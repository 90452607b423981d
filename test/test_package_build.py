"""The package builds the two ways users build it: `colcon build` in a ROS 2 workspace (as on a robot),
and `pip install .` of the library without ROS (as on a training server). package.xml is valid for ament.

The colcon build takes one to two minutes on two cores; it is marked `slow` and is part of `make test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
PACKAGE = "facial_perception"
ROS_EXECUTABLES = ("perception_node", "demo_camera", "demo_listener", "demo", "hri_bridge")
# what survives into the subprocesses' minimal environment
KEPT_ENVIRONMENT = (
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "USER",
    "ROS_DOMAIN_ID",
    "ROS_AUTOMATIC_DISCOVERY_RANGE",
)


def _version() -> str:
    text = (REPO / PACKAGE / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    assert match, "__version__ missing"
    return match.group(1)


def _clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment, as a fresh shell would have it (no PYTHONPATH to the sources under test)."""
    env = {key: value for key, value in os.environ.items() if key in KEPT_ENVIRONMENT}
    env["PATH"] = os.pathsep.join([str(VENV / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------- package.xml
def test_package_xml_is_valid_for_ament() -> None:
    """ament_cmake parses package.xml with catkin_pkg; an invalid one fails the configure step on a robot."""
    from catkin_pkg.package import parse_package

    package = parse_package(str(REPO / "package.xml"))
    package.validate()  # raises InvalidPackage (e.g. for an invalid maintainer e-mail)
    assert package.name == PACKAGE
    assert package.package_format == 3
    assert package.version == _version(), "package.xml and facial_perception/__init__.py versions differ"
    assert package.get_build_type() == "ament_cmake"
    assert "rosidl_interface_packages" in [group.name for group in package.member_of_groups]
    buildtool = {d.name for d in package.buildtool_depends}
    assert {"ament_cmake", "rosidl_default_generators"} <= buildtool
    run = {d.name for d in package.exec_depends}
    required = {
        "rclpy",
        "sensor_msgs",
        "std_msgs",
        "std_srvs",
        "diagnostic_msgs",
        "lifecycle_msgs",
        "builtin_interfaces",
        "action_msgs",
        "rosidl_default_runtime",
        "python3-numpy",
        "python3-opencv",
    }
    assert required <= run, f"missing exec_depend: {required - run}"


# ----------------------------------------------------------------------------------------------- setup.py
def test_setup_py_builds_a_ros_free_wheel(tmp_path: Path) -> None:
    """`pip install .` for training servers: the library, its shipped models and the console script."""
    src = tmp_path / "src"
    shutil.copytree(REPO / PACKAGE, src / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "setup.py", src / "setup.py")
    if (REPO / "docs" / "INSTALL.md").is_file():
        (src / "docs").mkdir()
        shutil.copy2(REPO / "docs" / "INSTALL.md", src / "docs" / "INSTALL.md")
    # a stand-in weights file proves models/*.safetensors is packaged (the real one may not exist yet)
    (src / PACKAGE / "models").mkdir(exist_ok=True)
    probe = src / PACKAGE / "models" / "packaging_probe.safetensors"
    probe.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # an empty safetensors file
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--disable-pip-version-check", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = wheels.glob(f"{PACKAGE}-{_version()}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"{PACKAGE}-{_version()}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    for subpackage in ("", "core/", "pipeline/", "bags/", "ros/"):
        assert f"{PACKAGE}/{subpackage}__init__.py" in names
    assert f"{PACKAGE}/models/packaging_probe.safetensors" in names
    generated = [n for n in names if n.split("/")[:2] in ([PACKAGE, k] for k in ("msg", "srv", "action"))]
    assert not generated, f"generated ROS code in the wheel: {generated}"
    for script in (
        r"^facial-perception\s*=\s*facial_perception\.core\.cli:main$",
        r"^facial-perception-bag\s*=\s*facial_perception\.bags\.cli:main$",
        r"^facial-perception-gallery\s*=\s*facial_perception\.pipeline\.gallery_cli:main$",
    ):
        assert re.search(script, entry_points, re.MULTILINE), entry_points
    requires = set(re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)", metadata, re.MULTILINE))
    expected = {"torch", "numpy", "safetensors", "opencv-python-headless", "scipy", "tqdm", "matplotlib"}
    assert expected | {"pillow"} <= requires
    assert "Requires-Dist: torch>=2.3" in metadata
    ros = [name for name in requires if name.startswith(("ros-", "rclpy"))]
    assert not ros, f"the library must not require ROS: {ros}"


# ----------------------------------------------------------------------------------------------- colcon build
@pytest.mark.slow
def test_colcon_build_of_a_workspace(tmp_path: Path) -> None:
    """A workspace holding the repository builds with stock colcon (ament_cmake, not setup.py), and the
    install tree holds the interfaces, the library, launch/config files and executables that work."""
    colcon = VENV / "bin" / "colcon"
    if not colcon.exists():
        pytest.fail(f"colcon not found in {VENV}: run scripts/setup.sh")
    workspace = tmp_path / "ws"
    (workspace / "src").mkdir(parents=True)
    (workspace / "src" / PACKAGE).symlink_to(REPO, target_is_directory=True)
    env = _clean_env(
        VIRTUAL_ENV=str(VENV),
        AMENT_PREFIX_PATH=str(VENV),  # the ROS "underlay" is the venv here (/opt/ros/<distro> on a robot)
        CMAKE_PREFIX_PATH=str(VENV),
        COLCON_HOME=str(workspace / ".colcon"),  # ignore any user-level colcon defaults
        MAKEFLAGS="-j2",
    )
    build = subprocess.run(
        [str(colcon), "--log-base", "log", "build", "--base-paths", "src", "--build-base", "build",
         "--install-base", "install", "--event-handlers", "console_direct-",
         "--cmake-args", "-DBUILD_TESTING=OFF"],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    assert f"Finished <<< {PACKAGE}" in build.stdout
    # third_party/hri_msgs (COLCON_IGNORE) is not a second package: a robot uses its installed hri_msgs
    assert "hri_msgs" not in build.stdout and not (workspace / "install" / "hri_msgs").exists()

    # colcon chose the ament_cmake build (CMake cache), not setup.py
    assert (workspace / "build" / PACKAGE / "CMakeCache.txt").is_file()
    prefix = workspace / "install" / PACKAGE
    site = next(prefix.glob(f"lib/python3*/site-packages/{PACKAGE}"))
    generated = ("msg/_face_array.py", "srv/_enrol_identity.py", "action/_add_task_column.py")
    for module in (*generated, "__init__.py"):
        assert (site / module).is_file(), module
    for sub in ("core", "pipeline", "ros", "bags"):
        assert (site / sub / "__init__.py").is_file(), sub
    # the hand-written __init__ (extend_path) won over a generated one
    assert (site / "__init__.py").read_text() == (REPO / PACKAGE / "__init__.py").read_text()
    for model in (REPO / PACKAGE / "models").glob("*.safetensors"):
        assert (site / "models" / model.name).is_file(), f"shipped model {model.name} not installed"
    share = prefix / "share" / PACKAGE
    for name in ("perception.launch.py", "camera_perception.launch.py", "hri_bridge.launch.py"):
        assert (share / "launch" / name).is_file()
    for name in ("perception.yaml", "demo.yaml", "hri_bridge.yaml"):
        assert (share / "config" / name).read_text() == (REPO / "config" / name).read_text()
    assert (share / "package.xml").is_file() and (share / "msg" / "FaceArray.msg").is_file()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).is_file()
    executables = [prefix / "lib" / PACKAGE / name for name in ROS_EXECUTABLES]
    clis = [
        prefix / "bin" / name
        for name in ("facial-perception", "facial-perception-bag", "facial-perception-gallery")
    ]
    for executable in (*executables, *clis):
        assert executable.is_file() and os.access(executable, os.X_OK), executable
        shebang = executable.read_text().splitlines()[0]
        assert shebang.startswith("#!") and Path(shebang[2:].split()[0]).exists(), f"{executable}: {shebang}"

    # the built package imports from the install tree (sourced as a user would) in a fresh process
    probe = (
        "import facial_perception, facial_perception.core, facial_perception.pipeline\n"
        "import facial_perception.msg as m\n"
        "from facial_perception.action import AddTaskColumn\n"
        "from facial_perception.srv import ListTasks\n"
        "from rclpy.serialization import serialize_message, deserialize_message\n"
        "msg = m.FaceArray(faces=[m.Face(track_id=7, identity='ada')], frame_seq=3)\n"
        "back = deserialize_message(serialize_message(msg), m.FaceArray)\n"
        "assert back.faces[0].track_id == 7 and back.faces[0].identity == 'ada'\n"
        "print(m.__file__); print(facial_perception.core.__file__)\n"
    )
    run = subprocess.run(
        ["bash", "-c", f'. "{workspace}/install/setup.bash" && exec python -c "$0"', probe],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    msg_file, core_file = run.stdout.split()[-2:]
    assert Path(msg_file).is_relative_to(prefix), msg_file
    assert Path(core_file).is_relative_to(prefix), core_file
