"""Test session setup: 8 forced CPU devices (for the sharding tests), CPU only.

XLA_FLAGS must be set before jax is first imported, which is why it lives here.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

# One persistent compilation cache for the session: every `python -m
# experiments...` that a test starts inherits this environment, so the tiny
# model's train step is compiled once, not once per subprocess (about 25 -> 12 s
# per tiny training run). A size limit makes jax lock the cache (filelock) while
# reading or writing an entry. The test processes use it only for compilations
# of a second or more (below): they compile many small functions once each, and
# writing every one to the cache made them about 2x slower; the train steps and
# searches that several tests compile alike made test_train.py 12% faster, and
# test_decoding.py with test_model.py 10%, with a threshold of one second.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="transformer-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)

import jax  # noqa: E402

jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from transformer import config  # noqa: E402


@pytest.fixture(scope="session")
def tiny() -> config.ModelConfig:
    """The tiny preset in float32 without dropout: numeric tests compare exactly."""
    return config.preset("tiny").replace(dropout=0.0)


@pytest.fixture
def step_sources(monkeypatch) -> list[int]:
    """The number of sources of every decoder step function made from here on
    (`decoding.step_function`), in order: how a search split its batch."""
    from transformer import decoding

    made, sizes = decoding.step_function, []

    def recording(model, params, inputs, **options):
        sizes.append(inputs.shape[0])
        return made(model, params, inputs, **options)

    monkeypatch.setattr(decoding, "step_function", recording)
    return sizes


@pytest.fixture
def make_tokens():
    """make_tokens(shape, vocab_size=512): random ids avoiding the special ids 0..3."""
    rng = np.random.default_rng(0)

    def make(shape, vocab_size: int = 512) -> jax.Array:
        return jax.numpy.asarray(rng.integers(4, vocab_size, shape), jax.numpy.int32)

    return make


# ----------------------------------------------------------------------------
# A small corpus in the format of Debian's trans-de-en file (the Ding dictionary).
# ----------------------------------------------------------------------------

DING_HEADER = """\
# Version :: devel 2023-01-30
# Copyright (c) :: Frank Richter <frank.richter.tu-chemnitz.de>
"""

DING_PHRASES = """\
Aal {m} (auf der Speisekarte) [cook.] | Aal blau; blauer Aal :: Eel (on a menu) | Eel au bleu
Aalsuppe {f} [cook.] | Aalsuppen {pl} :: eel soup | eel soups
Sonnenbräune {f}; Bräune {f} | eine tiefe Bräune haben :: suntan; tan | to have a deep tan; to be very tanned
Straße {f} | Straßen {pl} :: street; road | streets; roads
Größe {f} [ugs.] <Groesse> :: size
grün {adj} :: green
etw. öffnen {vt} | öffnend | geöffnet :: to open sth. | opening | opened
Haus {n} | Häuser {pl} :: house | houses
schön; hübsch {adj} :: beautiful; pretty
Tür {f} | Türen {pl} :: door | doors
kaputt [ugs.] | kaputter :: broken | more broken
falsch aligned | zweiter Teil :: wrongly aligned
"""

_SUBJECTS = [
    ("Der Hund", "The dog"),
    ("Die Katze", "The cat"),
    ("Mein Bruder", "My brother"),
    ("Unsere Lehrerin", "Our teacher"),
    ("Der alte Mann", "The old man"),
    ("Das Mädchen", "The girl"),
    ("Ein Bäcker", "A baker"),
    ("Die Ärztin", "The doctor"),
]
_VERBS = [
    ("sieht", "sees"),
    ("öffnet", "opens"),
    ("malt", "paints"),
    ("sucht", "looks for"),
    ("kauft", "buys"),
    ("zählt", "counts"),
]
_OBJECTS = [
    ("das grüne Haus", "the green house"),
    ("eine schöne Tür", "a beautiful door"),
    ("die Straße", "the street"),
    ("einen großen Aal", "a big eel"),
    ("die kaputte Tür", "the broken door"),
]
_ENDS = [(".", "."), ("!", "!"), (" [ugs.].", ".")]


def ding_sentence_lines() -> list[str]:
    """240 distinct example sentences, one per line, some with annotations."""
    lines = []
    for i, (s_de, s_en) in enumerate(_SUBJECTS):
        for j, (v_de, v_en) in enumerate(_VERBS):
            for k, (o_de, o_en) in enumerate(_OBJECTS):
                e_de, e_en = _ENDS[(i + j + k) % len(_ENDS)]
                lines.append(f"{s_de} {v_de} {o_de}{e_de} :: {s_en} {v_en} {o_en}{e_en}")
    return lines


@pytest.fixture(scope="session")
def ding_sample_dir(tmp_path_factory):
    """A manual_dir holding a small `de-en` file in the Ding format."""
    folder = tmp_path_factory.mktemp("ding_manual")
    text = DING_HEADER + DING_PHRASES + "\n".join(ding_sentence_lines()) + "\n"
    (folder / "de-en").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def ding_sample(tmp_path_factory, ding_sample_dir):
    """DataConfig of the sample corpus, built (TFDS array_record) in a temporary data_dir."""
    from transformer.data import datasets

    data = config.DataConfig(
        dataset="ding_de_en",
        direction="de-en",
        manual_dir=str(ding_sample_dir),
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        batching="packed",
        batch_rows=8,
        row_length=32,
        max_len=32,
        tokens_per_batch=256,
    )
    datasets.prepare(data)
    return data


@pytest.fixture(scope="session")
def sample_vocab(tmp_path_factory, ding_sample):
    """A 350-piece vocabulary trained on the sample corpus, saved in a workdir."""
    from transformer.data import pipeline

    workdir = tmp_path_factory.mktemp("vocab_workdir")
    return pipeline.vocabulary(ding_sample, str(workdir), 350, is_chief=True)


# ----------------------------------------------------------------------------
# A trained tiny model in a workdir, shared by the tests of the entry points
# that load one (translate, evaluate, average, attention maps).
# ----------------------------------------------------------------------------


def tiny_training_args(ding_sample, workdir, steps: int, checkpoint_every: int = 4) -> list[str]:
    """Flags of experiments.wmt for the tiny model on the sample corpus."""
    return [
        f"--manual_dir={ding_sample.manual_dir}",
        f"--data_dir={ding_sample.data_dir}",
        "--dataset=ding_de_en",
        "--direction=de-en",
        "--preset=tiny",
        "--vocab_size=350",
        "--max_len=32",
        "--row_length=32",
        "--batch_rows=8",
        f"--steps={steps}",
        "--warmup_steps=10",
        "--log_every=1",
        "--eval_every=0",
        "--eval_bleu_sentences=0",
        "--final_eval_split=",
        f"--checkpoint_every={checkpoint_every}",
        "--checkpoint_minutes=0",
        # MFU against a given peak: timing the host's matmuls would cost each run 1-2 s
        # (test_every_long_phase_of_a_run_shows_progress times them).
        "--peak_tflops=0.1",
        f"--workdir={workdir}",
    ]


def run_module(
    module: str, *args: str, check: bool = True, stdin: bytes | None = None, env: dict | None = None
):
    """Runs `python -m module args` on one CPU device (with `env` added to this process's
    environment); returns the CompletedProcess (bytes)."""
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, env=env, input=stdin
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr.decode(errors="replace")[-3000:])
    return result


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, ding_sample):
    """A workdir with the tiny model trained 240 steps, checkpoints at 80, 160, 240.

    Built once for all test workers (a file lock in their shared temp folder).
    """
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own folder below this
        shared = shared.parent
    workdir = shared / "trained_tiny"
    with open(shared / "trained_tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "done").exists():
            # The sample corpus of this worker: each worker builds its own copy.
            run_module(
                "experiments.wmt",
                *tiny_training_args(ding_sample, workdir, 240, checkpoint_every=80),
                "--warmup_steps=40",
            )
            (workdir / "done").write_text("")
    return workdir


def pytest_unconfigure(config):
    """The process that made the compilation cache removes it (workers inherit it)."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
