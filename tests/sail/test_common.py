"""The stages' logs hold the kit's lines, not library noise: without torchvision, transformers 5
warns once per image processor class that diffusers' pipelines import; sail.common.setup_logging
drops those lines. The check hides torchvision from a fresh interpreter (the README's plain
`pip install -r requirements.txt` does not bring it) and shows the warning without the filter."""
import subprocess
import sys
import textwrap
from pathlib import Path

KIT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import importlib.metadata, importlib.util, sys
    find_spec, version = importlib.util.find_spec, importlib.metadata.version

    def hidden_find_spec(name, package=None):
        return None if name.split(".")[0] == "torchvision" else find_spec(name, package)

    def hidden_version(name):
        if name == "torchvision":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    importlib.util.find_spec, importlib.metadata.version = hidden_find_spec, hidden_version
    sys.modules["torchvision"] = None  # an import of it fails as if it were not installed
    from sail import common
    from transformers.utils import import_utils
    assert not import_utils.is_torchvision_available()
    if sys.argv[2] == "kit":
        common.setup_logging(sys.argv[1], "generate")
    import diffusers
    diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline
    print("pipelines imported")
""")


def run_without_torchvision(tmp_path, logging_set_up):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "kit" if logging_set_up else "none"],
                            cwd=KIT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pipelines imported" in result.stdout
    return result.stdout + result.stderr


def test_no_torchvision_warning_in_the_logs(tmp_path):
    assert "requires torchvision" in run_without_torchvision(tmp_path, logging_set_up=False)  # the noise exists
    output = run_without_torchvision(tmp_path, logging_set_up=True)
    assert "requires torchvision" not in output
    assert "requires torchvision" not in (tmp_path / "log.txt").read_text()
