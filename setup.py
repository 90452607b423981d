"""pip installation of the facial_perception library WITHOUT ROS (training servers, notebooks).

    pip install .            # core, pipeline, bags, ros sources + the `facial-perception` command

The ROS 2 package is built by CMake (package.xml declares build_type ament_cmake, so colcon never runs
this file); the generated msg/srv/action modules exist only in a ROS build. ``facial_perception.ros``
is installed as source but needs rclpy and the generated interfaces to import.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def read_version() -> str:
    """The single source of the version is facial_perception/__init__.py (package.xml must match it)."""
    text = (HERE / "facial_perception" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("__version__ not found in facial_perception/__init__.py")
    return match.group(1)


setup(
    name="facial_perception",
    version=read_version(),
    description="Identity, age group, gender and emotion of faces: BEGAN encoder + progressive task columns",
    long_description=(HERE / "docs" / "INSTALL.md").read_text(encoding="utf-8")
    if (HERE / "docs" / "INSTALL.md").is_file()
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["facial_perception", "facial_perception.*"]),
    package_data={"facial_perception": ["models/*.safetensors", "models/*.json"]},
    include_package_data=False,
    zip_safe=False,
    install_requires=[
        "torch>=2.3",
        "numpy>=1.24",
        "safetensors>=0.4",
        "opencv-python-headless>=4.8",
        "scipy>=1.10",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pillow>=10.0",
    ],
    extras_require={
        # the offline BlazeFace detector (the Haar detector needs only OpenCV); see docs/INSTALL.md
        # (mediapipe ships the weights; ai-edge-litert runs them ~1 ms faster per frame than its graph)
        "blazeface": ["mediapipe>=0.10.14", "ai-edge-litert>=2.0"],
        "bags": ["rosbags>=0.10"],
        "test": ["pytest>=8", "scikit-image>=0.22"],
    },
    entry_points={
        "console_scripts": [
            "facial-perception=facial_perception.core.cli:main",
            "facial-perception-bag=facial_perception.bags.cli:main",
            "facial-perception-gallery=facial_perception.pipeline.gallery_cli:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
