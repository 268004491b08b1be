"""The environment promises of DEVELOPERS.md: no package that cannot install here is required."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"apex", "inplace-abn", "inplace_abn", "mmcv", "mmcv-full", "multicoretsne"}


def _requirement_names():
    names = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower())
    return names


def test_requirements_installable_set():
    names = _requirement_names()
    assert "torch" in names and "torchvision" in names
    assert not FORBIDDEN & set(names)


def test_core_imports():
    import huggingface_hub  # noqa: F401
    import safetensors  # noqa: F401
    import tensorboardX  # noqa: F401
    import timm  # noqa: F401
    import torch
    import torchvision.transforms.v2  # noqa: F401

    assert torch.__version__.startswith("2.")
