"""launch/colab_tpu.ipynb: a clean nbformat 4 file of plain-Python cells, and the whole
notebook run top to bottom on CPU, tiny model on the sample corpus."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_training_args

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def is_parameters(cell: dict) -> bool:
    return "parameters" in cell["metadata"].get("tags", [])


def test_notebook_is_nbformat_4_without_outputs():
    notebook = load_notebook()
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["metadata"], dict) and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    cells = code_cells(notebook)
    assert [is_parameters(cell) for cell in cells] == [True] + [False] * (len(cells) - 1)


def test_code_cells_are_plain_python_naming_shipped_flagfiles():
    """No IPython magics (the cells run as one script), and the flagfiles exist."""
    code = [source(cell) for cell in code_cells(load_notebook())]
    for text in code:
        compile(text, "cell", "exec")
        assert not re.search(r"^\s*[!%]", text, re.M)
    flagfiles = set(re.findall(r"experiments/configs/\w+\.flags", "\n".join(code)))
    assert flagfiles == {
        "experiments/configs/ding_deen_cpu.flags",
        "experiments/configs/wmt14_ende_base.flags",
    }
    assert all((ROOT / path).is_file() for path in flagfiles)


def notebook_script(overrides: dict) -> str:
    """The code cells as one script, the overrides assigned right after the parameters."""
    parts = []
    for cell in code_cells(load_notebook()):
        parts.append(source(cell))
        if is_parameters(cell):
            for name, value in overrides.items():
                # A renamed parameter must fail here, not be silently ignored.
                assert re.search(rf"^{name} = ", source(cell), re.M), name
                parts.append(f"{name} = {value!r}")
    return "\n\n".join(parts) + "\n"


@pytest.mark.slow
def test_notebook_trains_translates_and_draws_on_cpu(ding_sample, tmp_path):
    workdir, out = tmp_path / "workdir", tmp_path / "outputs"
    sentences = ["Der Hund sieht das grüne Haus.", "Die Katze malt die Straße!", "Haus"]
    flags = tiny_training_args(ding_sample, workdir, steps=40, checkpoint_every=20)
    script = tmp_path / "notebook.py"
    script.write_text(
        notebook_script(
            {
                "INSTALL": False,
                "REPO_DIR": str(ROOT),
                "WORKDIR": str(workdir),
                "TRAIN_MINUTES": 5,
                "EXTRA_FLAGS": [*flags, "--warmup_steps=40", "--log_every=10"],
                "OUTPUT_DIR": str(out),
                "SENTENCES": sentences,
                "ATTENTION_SENTENCE": "Mein Bruder kauft eine schöne Tür.",
            }
        ),
        encoding="utf-8",
    )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    # 1. the devices, listed by a separate process
    assert "[CpuDevice(id=0)]" in result.stdout
    # 2. training: checkpoints every 20 steps, up to the last (40)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [20, 40]
    # 3. one translation per sentence, in the file and printed beside its source
    assert len((out / "sentences.en.txt").read_text(encoding="utf-8").splitlines()) == 3
    printed = [line for line in result.stdout.splitlines() if "  ->  " in line]
    assert [line.split("  ->  ")[0] for line in printed] == sentences
    # 4. the attention maps, the last encoder-decoder layer shown
    pngs = sorted((out / "attention_maps").glob("*.png"))
    assert len(pngs) == 6 and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    shown = out / "attention_maps" / "encoder_decoder_layer2.png"
    assert f"showing {shown}" in result.stdout
