"""A trained model in use: translate, evaluate, average, attention maps, and the BLEU figures."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from conftest import run_module

from transformer import decoding, metrics, record, sharding, trained, translation
from transformer.config import EOS_ID, DecodeConfig
from transformer.data.vocab import VOCAB_FILE, Vocabulary
from transformer.translation import Translator, minimum_bayes_risk, sentence_chrf_matrix


def _lines(data: bytes) -> list[str]:
    text = data.decode("utf-8")
    assert text.endswith("\n") or text == ""
    return text.split("\n")[:-1]


def _one_line_error(result, program: str) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr.decode()[-2000:]
    assert lines[0].startswith(f"{program}: error:")
    return lines[0]


HARD_INPUT = [
    "Der Hund sieht das grüne Haus.".encode(),
    b"",
    b"   \t ",
    ("Die Katze öffnet eine schöne Tür. " * 300).encode(),  # ~10,000 characters
    b"Die Stra\xdfe ist kaputt.",  # Latin-1, not UTF-8
    "Der alte Mann\x07 kauft\x1b die Straße.".encode(),  # control characters
    "Mein Bruder 看 das Haus, мой брат.".encode(),  # mixed scripts
    "Unsere Lehrerin malt die kaputte Tür!".encode(),
    b"",
]


def test_translate_gives_one_line_per_input_line(trained_workdir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes(b"\n".join(HARD_INPUT) + b"\n")
    out = tmp_path / "out.txt"
    result = run_module(
        "experiments.translate",
        f"--workdir={trained_workdir}",
        f"--input={source}",
        f"--output={out}",
        "--chunk_lines=4",
    )
    lines = _lines(out.read_bytes())
    assert len(lines) == len(HARD_INPUT)
    assert lines[1] == "" and lines[2] == "" and lines[8] == ""
    assert all(lines[i].strip() for i in (0, 3, 4, 5, 6, 7))
    stderr = result.stderr.decode()
    assert "line 4: longer than the model's 31 tokens, translated in" in stderr
    assert "line 5: invalid UTF-8 replaced" in stderr
    assert f"{len(HARD_INPUT)}/{len(HARD_INPUT)} lines" in stderr  # the progress bar
    assert not (tmp_path / "out.txt.partial").exists()


def test_a_file_in_another_encoding_is_named_line_by_line_then_counted(trained_workdir):
    latin1 = "Die Straße ist schön.\n".encode("latin-1") * 8
    result = run_module(  # stdout by name, a pipe (once: a .partial beside /proc/PID/fd/pipe:[N])
        "experiments.translate", f"--workdir={trained_workdir}", "--output=/dev/stdout",
        stdin=latin1,
    )  # fmt: skip
    assert len(_lines(result.stdout)) == 8
    warnings = result.stderr.decode().splitlines()
    named = [w for w in warnings if "invalid UTF-8 replaced by U+FFFD" in w and "line " in w]
    assert [w.split()[2] for w in named] == ["1:", "2:", "3:", "4:", "5:"]
    assert "iconv -f latin1" in named[0] and "iconv" not in named[1]
    assert "warning: 8 lines in all held invalid UTF-8, replaced by U+FFFD" in warnings


def test_translate_keeps_input_order(trained_workdir):
    sentences = [
        "Der Hund sieht das grüne Haus.",
        "Die Ärztin zählt die Straße!",
        "Ein Bäcker kauft einen großen Aal.",
        "Das Mädchen sucht die kaputte Tür.",
    ]
    args = ("experiments.translate", f"--workdir={trained_workdir}", "--beam_size=1")
    forward = _lines(run_module(*args, stdin="\n".join(sentences).encode() + b"\n").stdout)
    order = [2, 0, 3, 1]
    shuffled = "\n".join(sentences[i] for i in order).encode() + b"\n"
    backward = _lines(run_module(*args, stdin=shuffled).stdout)
    assert backward == [forward[i] for i in order]
    assert len(set(forward)) > 1  # the test tells sentences apart


def test_translations_round_trip_through_the_vocabulary(trained_workdir):
    model = trained.load(str(trained_workdir))
    outputs = Translator(model.model, model.params, model.vocab).translate(
        ["Der Hund sieht das grüne Haus.", "Die Katze malt die Straße!"]
    )
    for text in outputs:
        assert text.strip()
        assert model.vocab.decode(model.vocab.encode(text)) == text


def test_mbr_chooses_among_the_n_best_by_consensus(trained_workdir, monkeypatch):
    model = trained.load(str(trained_workdir))
    texts = [
        "Der Hund sieht das grüne Haus.",
        "Die Katze malt die Straße!",
        "Ein Bäcker kauft einen großen Aal.",
        "Das Mädchen sucht die kaputte Tür.",
        "Unsere Lehrerin malt die kaputte Tür!",
        "Der alte Mann kauft die Straße.",
    ]
    translator = lambda d: Translator(model.model, model.params, model.vocab, d)  # noqa: E731
    plain = translator(DecodeConfig()).translate(texts)
    chosen = translator(DecodeConfig(mbr=4)).translate(texts)
    inputs = jnp.asarray(padded_ids(model.vocab, texts))
    tokens, _ = decoding.translate(model.model, model.params, inputs, DecodeConfig(mbr=4))
    n_best = [[model.vocab.decode(row) for row in rows] for rows in np.asarray(tokens)]
    assert [candidates[0] for candidates in n_best] == plain
    assert all(out in candidates for out, candidates in zip(chosen, n_best, strict=True))
    assert chosen != plain  # the consensus is not always the most likely
    with_samples = DecodeConfig(mbr=4, mbr_samples=6)
    sampled = translator(with_samples).translate(texts)
    assert all(out in candidates for out, candidates in zip(sampled, n_best, strict=True))
    again = translator(with_samples).translate(texts)
    assert again == sampled  # the draws are fixed by the seed
    batch = np.asarray(inputs, np.int32)
    draws = lambda d: translator(d)._sample(batch)  # noqa: E731
    assert not np.array_equal(draws(with_samples), draws(with_samples.replace(mbr_seed=1)))

    # The samples compete: each output is the pick among the N best and the source's draws,
    # and with some seed a draw wins for some source (which one depends on the trained
    # model's last bits, so a few seeds are tried).
    calls = []

    def recording(candidates, references, **settings):
        calls.append((candidates, references, settings))
        return minimum_bayes_risk(candidates, references, **settings)

    monkeypatch.setattr(translation, "minimum_bayes_risk", recording)
    a_draw_won = []
    for seed in range(1, 7):
        competing = with_samples.replace(
            mbr_sample_candidates=True, mbr_utility="chrf++", mbr_seed=seed
        )
        calls.clear()
        among = translator(competing).translate(texts)
        picks = [(n + r)[minimum_bayes_risk(n, r, **k)] for n, r, k in calls]
        assert sorted(n[0] for n, _, _ in calls) == sorted(plain)  # one call per source
        assert all(k["word_order"] == 2 and k["references_compete"] for _, _, k in calls)
        assert sorted(among) == sorted(picks)
        a_draw_won.append(any(pick not in n for (n, _, _), pick in zip(calls, picks, strict=True)))
    assert any(a_draw_won), a_draw_won


def test_translating_reports_its_progress_batch_by_batch(trained_workdir):
    model = trained.load(str(trained_workdir))
    texts = ["Der Hund.", "Die Katze malt die Straße!", "", "Der Hund.", "Ein Bäcker kauft Aal."]
    calls = []
    translator = Translator(
        model.model, model.params, model.vocab, DecodeConfig(beam_size=2),
        tokens_per_batch=16, on_progress=lambda done, of: calls.append((done, of)),
    )  # fmt: skip
    translator.translate(texts)
    # Three distinct non-empty texts in batches of at most 16 tokens: more than one batch.
    assert len(calls) > 1 and calls[-1] == (3, 3)
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})


def test_batch_plan_shares_shapes_and_merges_small_buckets():
    rng = np.random.default_rng(0)
    # 300 texts of 9-12 tokens (bucket 12), 3 of 5 (bucket 8: too few, they join 12),
    # 40 of 30 (bucket 32), 2 empty ones.
    lengths = np.concatenate([rng.integers(9, 13, 300), [5, 5, 5], [30] * 40, [0, 0]])
    rng.shuffle(lengths)
    plan = translation.plan_batches(lengths, 1024, (8, 12, 16, 24, 32), row_multiple=4)
    indices = [i for _, _, texts in plan for i in texts]
    assert sorted(indices) == [i for i in range(len(lengths)) if lengths[i] > 0]  # each once
    assert all(lengths[i] <= length for length, _, texts in plan for i in texts)
    assert all(rows * length <= 1024 and rows % 4 == 0 for length, rows, _ in plan)
    assert all(len(texts) <= rows for _, rows, texts in plan)
    # 303 texts at 12 fit 84 rows a batch (1024 // 12, a multiple of 4): 4 batches,
    # cut equal (76 rows) rather than 84, 84, 84, 51; 40 at 32: 2 of 20, not 32 and 8.
    assert [(length, rows) for length, rows, _ in plan] == [(12, 76)] * 4 + [(32, 20)] * 2
    assert [len(texts) for _, _, texts in plan] == [76, 76, 76, 75, 20, 20]
    # A small bucket joins a longer one; the last stays however small.
    assert translation.plan_batches(np.asarray([3, 40]), 1024, (8, 64)) == [(64, 2, [0, 1])]
    assert translation.plan_batches(np.asarray([40]), 1024, (8, 64)) == [(64, 1, [0])]


def test_programs_are_compiled_ahead_once_per_shape(trained_workdir, caplog):
    """Each batch shape's search and sampler compile once, in the background
    thread, and the decoding calls reuse them instead of compiling again."""
    model = trained.load(str(trained_workdir))
    # Settings of this test only: no program of theirs is compiled yet.
    settings = DecodeConfig(beam_size=2, length_penalty=0.77, mbr=2, mbr_samples=3)
    texts = ["Der Hund.", "Die Katze.", "Der Bäcker.", "Die Katze malt die Straße!"]
    texts += ["Der Hund sieht das grüne Haus."]
    translator = Translator(
        model.model, model.params, model.vocab, settings, tokens_per_batch=16, min_bucket_texts=1
    )
    ids = [model.vocab.encode(t) + [EOS_ID] for t in texts]
    assert max(map(len, ids)) <= translator.max_source_tokens  # none is split
    batches = [batch.shape for _, batch in translator._batches(ids)]
    shapes = set(batches)
    assert len(batches) > len(shapes) > 1
    # As in training's evaluations: the mesh set and Flax's axis rules on (both
    # thread-local; the mesh is part of jit's cache key).
    mesh = sharding.make_mesh(sharding.parse_mesh("data:-1", jax.device_count()))
    translator.mesh = mesh
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("WARNING"), jax.set_mesh(mesh):
            with nn.logical_axis_rules(sharding.ACTIVATION_RULES):
                out = translator.translate(texts)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [
        (r.threadName, name)
        for r in caplog.records
        for name in ("decode_n_best", "decode_samples")
        if f"Finished XLA compilation of jit({name})" in r.getMessage()
    ]
    assert sorted(name for _, name in compiled) == sorted(
        ["decode_n_best", "decode_samples"] * len(shapes)
    )
    assert all(thread.startswith("compile-ahead") for thread, _ in compiled)
    assert len(out) == len(texts) and all(out)


def padded_ids(vocab, texts: list[str]) -> np.ndarray:
    """[len(texts), longest] source ids, each ended by EOS, PAD after."""
    ids = [vocab.encode(t) + [EOS_ID] for t in texts]
    return np.asarray([row + [0] * (max(map(len, ids)) - len(row)) for row in ids], np.int32)


def test_samples_are_drawn_in_chunks_no_larger_than_the_beam(trained_workdir, monkeypatch):
    model = trained.load(str(trained_workdir))
    texts = ["Der Hund sieht das Haus.", "Die Katze malt.", "Ein Bäcker kauft einen Aal.",
             "Das Mädchen sucht die Tür.", "Der Mann kauft.", "Unsere Lehrerin malt die Tür!",
             "Die Straße ist kaputt."]  # fmt: skip
    batch = padded_ids(model.vocab, texts)
    rows_seen = []
    sample = decoding.sample

    def recording(model_, params, inputs, key, decode):
        rows_seen.append(inputs.shape[0])
        return sample(model_, params, inputs, key, decode)

    monkeypatch.setattr(decoding, "sample", recording)
    # 7 sources x 6 samples under 7 x 4 beams: chunks of 4 sources, the last one padded.
    decode = DecodeConfig(mbr=4, mbr_samples=6, mbr_epsilon=0.99)
    # Only the most likely token reaches 0.99: every sample is the greedy output.
    translator = Translator(model.model, model.params, model.vocab, decode)
    drawn = translator._sample(batch)
    assert rows_seen == [4, 4]
    greedy = np.asarray(
        decoding.decode(model.model, model.params, jnp.asarray(batch), DecodeConfig(beam_size=1))
    )
    assert drawn.shape[:2] == (7, 6)
    for row, samples in zip(greedy, drawn, strict=True):
        assert all(model.vocab.decode(s) == model.vocab.decode(row) for s in samples)


def test_samples_are_drawn_in_small_chunks_on_a_cpu_with_the_same_draws(
    trained_workdir, monkeypatch
):
    model = trained.load(str(trained_workdir))
    decode = DecodeConfig(beam_size=8, mbr=8, mbr_samples=32)
    translator = Translator(model.model, model.params, model.vocab, decode)
    assert jax.default_backend() == "cpu"
    # 40 sources: the beam's 320 rows would allow 10 sources; a CPU chunk is 256 rows.
    assert translator._sample_rows(40) == translation.CPU_SAMPLE_ROWS // 32 == 8
    assert translator._sample_rows(5) == 1  # a small batch: within the beam's 40 rows
    monkeypatch.setattr(translation, "CPU_SAMPLE_ROWS", 10**6)
    assert translator._sample_rows(40) == 10
    # Chunks of 1, 2 or all 5 sources draw the same samples.
    texts = ["Der Hund sieht das Haus.", "Die Katze malt.", "Ein Bäcker kauft einen Aal.",
             "Das Mädchen sucht die Tür.", "Der Mann kauft."]  # fmt: skip
    batch = padded_ids(model.vocab, texts)
    small = Translator(model.model, model.params, model.vocab, DecodeConfig(mbr=2, mbr_samples=4))
    drawn = {}
    for rows in (4, 8, 10**6):  # 1, 2 and all 5 sources (the beam of 4 allows 20 rows)
        monkeypatch.setattr(translation, "CPU_SAMPLE_ROWS", rows)
        drawn[rows] = small._sample(batch)
    assert drawn[4].shape[:2] == (5, 4)
    np.testing.assert_array_equal(drawn[4], drawn[8])
    np.testing.assert_array_equal(drawn[4], drawn[10**6])
    assert len({tuple(s) for s in drawn[4].reshape(20, -1)}) > 5  # drawn, not all alike


def test_samples_of_a_trained_model_are_gathered_as_rows_end(trained_workdir, step_sources):
    """8 sources x 8 samples at epsilon 0.99 (each sample the greedy output): once
    at most 8 rows are left they continue as a batch of 8, and the outputs are greedy's."""
    model = trained.load(str(trained_workdir))
    texts = ["Der Hund.", "Die Katze malt die Straße!", "Ein Bäcker kauft Aal.", "Die Tür.",
             "Das Mädchen sucht die Tür und den Hund.", "Der Mann kauft.", "Unsere Lehrerin malt.",
             "Die Straße ist kaputt, sagt der Bäcker."]  # fmt: skip
    batch = jnp.asarray(padded_ids(model.vocab, texts))
    decode = DecodeConfig(mbr=2, mbr_samples=8, mbr_epsilon=0.99)
    drawn = np.asarray(decoding.decode_samples(
        model.model, model.params, batch, jax.random.key(0), decode
    ))  # fmt: skip
    assert step_sources == [64, 8]
    greedy = np.asarray(
        decoding.decode(model.model, model.params, batch, DecodeConfig(beam_size=1))
    )
    lengths = [list(row).index(EOS_ID) + 1 for row in greedy]
    assert len(set(lengths)) > 1  # the rows end at different steps
    for row, samples, n in zip(greedy, drawn, lengths, strict=True):
        assert all(list(sample[:n]) == list(row[:n]) for sample in samples)
        assert not samples[:, n:].any()


def test_minimum_bayes_risk_picks_the_consensus_candidate():
    agreed = "The weather is nice today."
    candidates = ["Xylophones quarrel loudly.", "The weather is nice today!", agreed, agreed]
    assert minimum_bayes_risk([*candidates, "The weather was nice today."]) == 2
    assert minimum_bayes_risk([agreed]) == 0
    assert minimum_bayes_risk(["Same.", "Same."]) == 0
    # Judged against other references (samples), another candidate wins.
    samples = ["Xylophones quarrel loudly!", "Xylophones quarrel loud.", agreed]
    assert minimum_bayes_risk(candidates, samples) == 0
    with pytest.raises(ValueError, match="mbr must be 0"):
        Translator(None, None, None, DecodeConfig(mbr=5))
    with pytest.raises(ValueError, match="mbr_samples needs mbr >= 2"):
        Translator(None, None, None, DecodeConfig(mbr_samples=8))
    with pytest.raises(ValueError, match="mbr_epsilon must be in"):
        Translator(None, None, None, DecodeConfig(mbr=2, mbr_samples=8, mbr_epsilon=1.0))


def _random_texts(rng):
    words = ["the", "weather", "is", "nice", "today", "Wetter", "schön", "ist", "it's", "a", "!"]
    return lambda: " ".join(rng.choice(words, rng.integers(0, 7)))


@pytest.mark.parametrize("word_order, beta", [(0, 2.0), (2, 2.0), (2, 1.75)])
def test_sentence_chrf_matrix_equals_sacrebleu_sentence_by_sentence(word_order, beta):
    # Random texts with shared words, punctuation, repeats and empty strings.
    rng = np.random.default_rng(1)
    text, metric = _random_texts(rng), sacrebleu.metrics.CHRF(word_order=word_order, beta=beta)
    for _ in range(60):
        hypotheses = [text() for _ in range(rng.integers(1, 6))]
        references = [text() for _ in range(4)]
        plain = [[metric.sentence_score(h, [r]).score for r in references] for h in hypotheses]
        got = sentence_chrf_matrix(hypotheses, references, word_order, beta)
        np.testing.assert_allclose(got, plain, rtol=0, atol=1e-9)


@pytest.mark.parametrize("word_order, beta", [(0, 2.0), (2, 1.75)])
def test_minimum_bayes_risk_chooses_as_sacrebleu_sentence_chrf_does(word_order, beta):
    """Against the plain computation with sacreBLEU's public sentence scores, with the
    references as candidates too (each left out of its own judges) or not."""
    rng = np.random.default_rng(0)
    text, metric = _random_texts(rng), sacrebleu.metrics.CHRF(word_order=word_order, beta=beta)
    leaving_out_mattered = 0
    for _ in range(60):
        candidates = [text() for _ in range(rng.integers(2, 6))]
        references = [text() for _ in range(rng.integers(2, 8))] if rng.random() < 0.7 else None
        against = candidates if references is None else references
        mean = lambda h, refs: np.mean([metric.sentence_score(h, [r]).score for r in refs])  # noqa: E731
        plain = [mean(c, against) for c in candidates]
        chosen = minimum_bayes_risk(candidates, references, word_order=word_order, beta=beta)
        assert plain[chosen] == pytest.approx(max(plain), abs=1e-9)
        assert chosen == candidates.index(candidates[chosen])  # the first of equal texts
        if references is None:
            continue
        pool = candidates + references
        plain += [
            mean(r, against) if r in candidates else mean(r, references[:i] + references[i + 1 :])
            for i, r in enumerate(references)
        ]
        chosen = minimum_bayes_risk(
            candidates, references, word_order=word_order, beta=beta, references_compete=True
        )
        assert plain[chosen] == pytest.approx(max(plain), abs=1e-9)
        assert chosen == pool.index(pool[chosen])
        with_itself = [mean(t, against) for t in pool]
        leaving_out_mattered += pool[int(np.argmax(with_itself))] != pool[chosen]
    assert leaving_out_mattered  # else the cases never tested leaving a reference out


def test_averaging_two_checkpoints_is_their_mean(trained_workdir, tmp_path):
    workdir = str(trained_workdir)
    config = record.read_configs(workdir).model
    assert record.checkpoint_steps(workdir) == [80, 160, 240]
    a = trained.load_params(workdir, config, 160)
    b = trained.load_params(workdir, config, 240)
    output = tmp_path / "avg"
    result = run_module(
        "experiments.average", f"--workdir={workdir}", "--last=2", f"--output={output}"
    )
    assert "steps 160, 240" in result.stdout.decode()
    averaged = trained.load(str(output))
    assert averaged.steps == (160, 240)  # from its meta; once (240,), as if not averaged
    assert averaged.describe() == "the average of steps 160, 240"
    for x, y, mean in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(averaged.params), strict=True
    ):
        np.testing.assert_allclose(mean, (np.asarray(x) + np.asarray(y)) / 2, rtol=1e-6)
    assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])  # they do differ
    # The average carries a fingerprint, as training's checkpoints do: altered bytes are named.
    params = output / "checkpoints" / "240" / "params"
    data = max((f for f in params.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(trained.CheckpointError, match="is corrupt: its parameters do not match"):
        trained.load(str(output))


def test_averaging_more_checkpoints_than_exist_is_refused(trained_workdir, tmp_path):
    result = run_module(
        "experiments.average",
        f"--workdir={trained_workdir}",
        "--last=5",
        f"--output={tmp_path / 'avg'}",
        check=False,
    )
    line = _one_line_error(result, "experiments.average")
    assert "has 3 (steps 80, 160, 240); ask for at most 3" in line
    assert not (tmp_path / "avg").exists()


def test_evaluate_scores_a_file_pair_and_a_split(trained_workdir, tmp_path):
    # One sentence twice: decoded once, counted twice in the progress.
    sources = ["Der Hund sieht das grüne Haus.", "Die Katze malt die Straße!"] * 2
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n")
    hyps = _lines(
        run_module(
            "experiments.translate",
            f"--workdir={trained_workdir}",
            stdin=("\n".join(sources) + "\n").encode(),
        ).stdout
    )
    (tmp_path / "ref.txt").write_text("\n".join(hyps) + "\n")  # references = own output
    result = run_module(
        "experiments.evaluate",
        f"--workdir={trained_workdir}",
        f"--source_file={tmp_path / 'src.txt'}",
        f"--reference_file={tmp_path / 'ref.txt'}",
        f"--hypotheses={tmp_path / 'hyp.txt'}",
    )
    scores = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert scores["sacrebleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in scores["sacrebleu_signature"]
    assert (tmp_path / "hyp.txt").read_text().splitlines() == hyps
    assert "translating src.txt: 4/4 sentences" in result.stderr.decode()  # progress, not stdout

    result = run_module(
        "experiments.evaluate",
        f"--workdir={trained_workdir}",
        "--split=test",
        "--average_last=2",
        "--beam_size=2",
    )
    text = result.stdout.decode()
    assert "the average of steps 160, 240" in text and "not comparable to sacreBLEU" in text
    scores = json.loads(text.strip().splitlines()[-1])
    assert 0.0 <= scores["sacrebleu"] <= 100.0 and scores["steps"] == [160, 240]
    written = _hypotheses_file(text)
    assert written == trained_workdir / "hypotheses.test.avg2.beam_size2.txt"  # not the default's
    hypotheses = written.read_text().splitlines()
    assert len(hypotheses) == int(text.split(" sentences")[0].split()[-1].replace(",", "")) > 0
    n = len(hypotheses)
    assert f"translating test: {n}/{n} sentences" in result.stderr.decode()


def test_decoding_defaults_to_the_workdirs_beam_and_length_penalty(trained_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir, workdir)
    cfg = json.loads((workdir / "config.json").read_text())
    assert (cfg["decode"]["beam_size"], cfg["decode"]["length_penalty"]) != (2, 1.5)
    cfg["decode"].update(beam_size=2, length_penalty=1.5, no_repeat_ngram=3, mbr=2, mbr_samples=3)
    (workdir / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "src.txt").write_text("Der Hund sieht das grüne Haus.\n")
    args = [f"--source_file={tmp_path / 'src.txt'}", f"--reference_file={tmp_path / 'src.txt'}"]
    text = run_module("experiments.evaluate", f"--workdir={workdir}", *args).stdout.decode()
    assert (
        "beam 2, alpha 1.5, no repeated 3-grams, MBR (chrF) over the 2 best against 3 samples "
        "(epsilon 0.02)\n"
    ) in text
    written = [_hypotheses_file(text)]
    text = run_module(
        "experiments.evaluate", f"--workdir={workdir}", "--beam_size=1", "--length_penalty=0",
        "--no_repeat_ngram=0", "--mbr=0", "--mbr_epsilon=0.02", *args,
    ).stdout.decode()  # fmt: skip
    assert "beam 1, alpha 0\n" in text
    written.append(_hypotheses_file(text))
    # A beam narrower than the workdir's MBR list turns MBR off, and says so.
    result = run_module("experiments.evaluate", f"--workdir={workdir}", "--beam_size=1", *args)
    assert "beam 1, alpha 1.5, no repeated 3-grams\n" in result.stdout.decode()
    assert "--beam_size=1 is below the workdir's mbr=2: MBR off" in result.stderr.decode()
    written.append(_hypotheses_file(result.stdout.decode()))
    # Each set of settings has its own hypotheses: the workdir's under the plain name,
    # the others named by what differs from it (--mbr_epsilon=0.02 is the workdir's).
    plain = written[0].name.removesuffix(".txt")
    assert [p.name for p in written] == [
        f"{plain}.txt",
        f"{plain}.beam_size1.length_penalty0.no_repeat_ngram0.mbr0.mbr_samples0.txt",
        f"{plain}.beam_size1.mbr0.mbr_samples0.txt",
    ]
    assert all(p.parent == workdir and p.read_text().count("\n") == 1 for p in written)


def _hypotheses_file(stdout: str) -> pathlib.Path:
    """The file that evaluate's output names as its hypotheses."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("hypotheses: ")]
    return pathlib.Path(line.removeprefix("hypotheses: "))


def test_attention_maps_writes_one_png_per_layer_and_kind(trained_workdir, tmp_path):
    result = run_module(
        "experiments.attention_maps",
        f"--workdir={trained_workdir}",
        "--sentence=Der Hund sieht das grüne Haus.".encode() + b" \xff",  # a stray byte
        f"--out_dir={tmp_path}",
    )
    assert "--sentence: invalid UTF-8 replaced by U+FFFD" in result.stderr.decode()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    # tiny: 2 encoder layers (self) and 2 decoder layers (self and encoder-decoder)
    assert pngs == [
        "decoder_self_layer1.png",
        "decoder_self_layer2.png",
        "encoder_decoder_layer1.png",
        "encoder_decoder_layer2.png",
        "encoder_self_layer1.png",
        "encoder_self_layer2.png",
    ]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote 6 attention maps" in result.stdout.decode()


def test_attention_weights_are_distributions_and_causal(trained_workdir):
    from transformer.analysis.attention_maps import attention_weights

    model = trained.load(str(trained_workdir))
    inputs = np.array([[10, 11, 12, 13, 1]])
    targets = np.array([[20, 21, 22, 1]])
    weights = attention_weights(model.model, model.params, inputs, targets)
    assert set(weights) == {
        (kind, layer)
        for kind in ("encoder_self", "decoder_self", "encoder_decoder")
        for layer in (0, 1)
    }
    for (kind, _), w in weights.items():
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        if kind == "decoder_self":
            assert np.all(np.triu(w, k=1) == 0)  # no position attends to a later one
        if kind == "encoder_decoder":
            assert w.shape[1:] == (4, 5)


def test_a_vocabulary_of_another_run_is_refused(trained_workdir, sample_vocab, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_workdir, copy)
    other = Vocabulary.load(copy / VOCAB_FILE)
    assert other.size == 350
    small = tmp_path / "small"
    from transformer.data import vocab as vocab_lib

    vocab_lib.load_or_train(
        small / VOCAB_FILE, lambda: ["ein kleiner Satz", "noch einer"] * 50, 276
    )
    shutil.copy(small / VOCAB_FILE, copy / VOCAB_FILE)
    result = run_module("experiments.translate", f"--workdir={copy}", stdin=b"Hallo\n", check=False)
    line = _one_line_error(result, "experiments.translate")
    assert "has 276 pieces but the model was trained with 350" in line


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--workdir is required"),
        (["--workdir=/nonexistent"], "not a training workdir"),
        (["--workdir=W", "--step=7"], "no checkpoint at step 7; it has steps 80, 160, 240"),
        (["--workdir=W", "--beam_size=0"], "beam_size must be a positive integer, got 0"),
        (["--workdir=W", "--no_repeat_ngram=-1"], "no_repeat_ngram must be an integer >= 0"),
        (["--workdir=W", "--mbr=1"], "mbr must be 0 (off) or from 2 to beam_size=4, got 1"),
        (["--workdir=W", "--beam_size=2", "--mbr=3"], "from 2 to beam_size=2, got 3"),
        (["--workdir=W", "--mbr_samples=-1"], "mbr_samples must be an integer >= 0, got -1"),
        (["--workdir=W", "--mbr_samples=4"], "mbr_samples needs mbr >= 2"),
        (["--workdir=W", "--beam=2"], "Unknown command line flag 'beam'"),
        (["--workdir=W", "--step=80", "--average_last=2"], "not both"),
        (["--workdir=W", "--input=/nonexistent.txt"], "cannot be read"),
        (["--workdir=W", "--compilation_cache=/dev/null/c"], "cannot make that folder"),
    ],
)
def test_translate_bad_flags_exit_1_with_one_line(trained_workdir, args, message):
    args = [a.replace("=W", f"={trained_workdir}") for a in args]
    result = run_module("experiments.translate", *args, check=False, stdin=b"Hallo\n")
    assert message in _one_line_error(result, "experiments.translate")


def test_a_path_flag_starting_with_a_tilde_is_in_the_home_folder(tmp_path):
    # `--workdir=~/w` reaches the program as written: the shell expands only a word's ~.
    result = run_module(
        "experiments.translate", "--workdir=~/nothing", check=False, stdin=b"Hallo\n",
        env={"HOME": str(tmp_path)},
    )  # fmt: skip
    assert f"{tmp_path}/nothing is not a training workdir" in _one_line_error(
        result, "experiments.translate"
    )
    result = run_module(  # a list of paths too
        "experiments.compare", "--workdirs=~/a,~/b", check=False, env={"HOME": str(tmp_path)}
    )
    line = _one_line_error(result, "experiments.compare")
    assert f"{tmp_path}/a has no results.json" in line


def _damaged_copy(trained_workdir, tmp_path, damage: str):
    copy = tmp_path / "copy"
    shutil.copytree(trained_workdir, copy)
    if damage == "config_not_json":
        (copy / "config.json").write_text("{not json")
    elif damage == "config_without_records":
        (copy / "config.json").write_text("{}")
    elif damage == "config_without_d_model":
        record = json.loads((copy / "config.json").read_text())
        del record["model"]["d_model"]
        (copy / "config.json").write_text(json.dumps(record))
    elif damage == "config_bad_value":  # edited by hand
        record = json.loads((copy / "config.json").read_text())
        record["model"]["num_heads"] = 0
        (copy / "config.json").write_text(json.dumps(record))
    elif damage == "vocab_garbage":
        (copy / VOCAB_FILE).write_bytes(bytes(range(256)) * 2)
    elif damage == "vocab_empty":
        (copy / VOCAB_FILE).write_bytes(b"")
    elif damage == "latest_checkpoint_truncated":
        params = copy / "checkpoints" / "240" / "params"
        data = max((f for f in params.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return copy


@pytest.mark.parametrize(
    "damage, message",
    [
        ("config_not_json", "config.json is not valid JSON"),
        ("config_without_records", "config.json is not a training config"),
        ("config_without_d_model", "its model record lacks d_model"),
        ("config_bad_value", "config.json: model num_heads must be a positive integer"),
        ("vocab_garbage", "vocab.model: not a SentencePiece model"),
        ("vocab_empty", "vocab.model: not a SentencePiece model (it is empty); restore it"),
        (
            "latest_checkpoint_truncated",
            "checkpoints/240 cannot be restored: Encountered error while reading",
        ),
    ],
)
def test_a_damaged_workdir_is_named_in_one_line(trained_workdir, tmp_path, damage, message):
    copy = _damaged_copy(trained_workdir, tmp_path, damage)
    result = run_module("experiments.translate", f"--workdir={copy}", stdin=b"Hallo\n", check=False)
    line = _one_line_error(result, "experiments.translate")
    assert message in line
    assert len(line) < 400 and "TensorStore" not in line
    if damage == "latest_checkpoint_truncated":
        assert "other checkpoints: steps 80, 160" in line


def test_outputs_that_cannot_be_written_are_refused_before_any_work(trained_workdir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("Das Haus.\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    result = run_module(
        "experiments.translate", f"--workdir={trained_workdir}", f"--input={source}",
        f"--output={folder}", check=False,
    )  # fmt: skip
    assert f"--output={folder} is a folder" in _one_line_error(result, "experiments.translate")
    assert sorted(os.listdir(tmp_path)) == ["folder", "in.txt"]  # no stray .partial file
    missing = tmp_path / "missing" / "h.txt"
    result = run_module(
        "experiments.evaluate", f"--workdir={trained_workdir}", f"--hypotheses={missing}",
        check=False,
    )  # fmt: skip
    line = _one_line_error(result, "experiments.evaluate")
    assert f"the folder {missing.parent} does not exist" in line


def _fingerprint(folder) -> dict:
    """The training's files; the hypotheses that evaluate tests write there meanwhile aside."""
    files = (f for f in sorted(folder.rglob("*")) if f.is_file())
    return {str(f): f.read_bytes() for f in files if not f.name.startswith("hypotheses.")}


def test_outputs_that_are_an_input_or_part_of_a_workdir_are_refused(trained_workdir, tmp_path):
    before = _fingerprint(trained_workdir)
    source = tmp_path / "in.partial"  # translate's temporary name for an output "in"
    source.write_text("Das Haus.\n")
    other = tmp_path / "other"  # another run's workdir, which an average must not take over
    other.mkdir()
    (other / "config.json").write_text("{}")
    cases = [
        ("experiments.translate", [f"--input={source}", f"--output={source}"],
         f"--output={source} is also the input"),
        ("experiments.translate", [f"--input={source}", f"--output={tmp_path / 'in'}"],
         f"--input={source} is where --output={tmp_path / 'in'} is written until complete"),
        ("experiments.translate", [f"--output={trained_workdir / 'config.json'}"],
         f"would overwrite {trained_workdir}'s config.json"),
        ("experiments.evaluate", [f"--hypotheses={trained_workdir / 'vocab.model'}"],
         f"would overwrite {trained_workdir}'s vocab.model"),
        ("experiments.evaluate", [f"--source_file={source}", f"--reference_file={source}",
                                  f"--hypotheses={source}"], "is also the input"),
        ("experiments.evaluate", ["--split=tset"], "--split must be one of"),
        ("experiments.evaluate", [f"--reference_file={source}"],
         "--reference_file needs --source_file"),
        ("experiments.evaluate", [f"--source_file={source}", "--split=test"],
         "--split and --source_file exclude each other"),
        ("experiments.average", [f"--output={trained_workdir / 'checkpoints' / '9999'}"],
         f"would overwrite the checkpoints of {trained_workdir}"),
        # Refused before the checkpoints are read (which --last=99 would fail).
        ("experiments.average", ["--last=99", f"--output={other}"],
         f"{other} holds another run's config.json"),
        ("experiments.average", ["--last=99", f"--output={source}"],
         f"{source} is a file; give --output a folder"),
        ("experiments.attention_maps", ["--sentence=Das Haus.",
                                        f"--out_dir={trained_workdir / 'checkpoints'}"],
         f"would write into the checkpoints of {trained_workdir}"),
        ("experiments.attention_maps", ["--sentence=Das Haus.", f"--out_dir={source}"],
         "is a file; give a folder"),
    ]  # fmt: skip
    for module, args, message in cases:
        result = run_module(module, f"--workdir={trained_workdir}", *args, check=False)
        assert message in _one_line_error(result, module)
    assert _fingerprint(trained_workdir) == before
    assert source.read_text() == "Das Haus.\n" and (other / "config.json").read_text() == "{}"


def test_translate_reads_a_pipe_once_drops_a_byte_order_mark_and_writes_through_a_link(
    trained_workdir, tmp_path
):
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("earlier\n")
    link.symlink_to(target)
    sentence = "Das Haus ist schön.\n".encode()
    result = run_module(
        "experiments.translate", f"--workdir={trained_workdir}", "--input=/dev/stdin",
        f"--output={link}", stdin=b"\xef\xbb\xbf" + sentence + sentence,
    )  # fmt: skip
    first, second = _lines(target.read_bytes())
    assert first == second and first.strip()  # the mark is not part of the first sentence
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["link.txt", "target.txt"]
    assert "translating: 2 lines" in result.stderr.decode()  # a stream: no total, no ETA


def test_translate_stopped_by_sigterm_keeps_the_earlier_output(trained_workdir, tmp_path):
    import signal
    import time

    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("Der Hund sieht das grüne Haus.\n" * 20000)
    out.write_text("earlier\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.translate", f"--workdir={trained_workdir}",
         f"--input={source}", f"--output={out}", "--chunk_lines=50"],
        stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    partial = tmp_path / "out.txt.partial"
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert partial.exists(), "no chunk was written within 120 s"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    lines = stderr.decode().strip().splitlines()
    assert process.returncode == 130 and lines[-1].endswith("error: interrupted"), lines[-3:]
    assert out.read_text() == "earlier\n" and not partial.exists()


def _translate(workdir, *args: str, stdin, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """experiments.translate with stdin and stdout as given (files, not only pipes)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    command = [sys.executable, "-m", "experiments.translate", f"--workdir={workdir}", *args]
    return subprocess.run(command, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env)


def test_translate_appends_to_stdout_by_name_and_refuses_its_input_as_output(
    trained_workdir, tmp_path
):
    source = tmp_path / "in.txt"
    source.write_text("Das Haus ist schön.\nDer Hund.\n")
    out = tmp_path / "out.txt"
    out.write_text("earlier\n")
    with open(source, "rb") as stdin, open(out, "ab") as appended:  # once: replaced the file
        result = _translate(
            trained_workdir, "--beam_size=1", "--output=/dev/stdout", stdin=stdin, stdout=appended
        )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    earlier, *translations = _lines(out.read_bytes())
    assert earlier == "earlier" and len(translations) == 2 and all(translations)
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.txt"]
    with open(source, "rb") as stdin:  # --output=F < F: once emptied F
        result = _translate(trained_workdir, f"--output={source}", stdin=stdin)
    assert "is also the input" in _one_line_error(result, "experiments.translate")
    assert source.read_text() == "Das Haus ist schön.\nDer Hund.\n"


def test_utf16_input_is_refused_in_one_line(trained_workdir, tmp_path):
    utf16 = "Das Haus.\r\nDer Hund.\r\n".encode("utf-16")  # with its byte-order mark
    out = tmp_path / "out.txt"
    result = run_module(
        "experiments.translate", f"--workdir={trained_workdir}", f"--output={out}",
        stdin=utf16, check=False,
    )  # fmt: skip
    assert "the input is UTF-16" in _one_line_error(result, "experiments.translate")
    assert os.listdir(tmp_path) == []  # once: three lines of garbage, and a fourth
    (tmp_path / "src.txt").write_bytes(utf16)
    (tmp_path / "ref.txt").write_text("The house.\nThe dog.\n")
    result = run_module(
        "experiments.evaluate", f"--workdir={trained_workdir}",
        f"--source_file={tmp_path / 'src.txt'}", f"--reference_file={tmp_path / 'ref.txt'}",
        check=False,
    )  # fmt: skip
    line = _one_line_error(result, "experiments.evaluate")
    assert f"{tmp_path / 'src.txt'}: the input is UTF-16" in line and "iconv -f utf-16" in line


def test_an_error_naming_a_path_that_is_not_utf8_is_printed(tmp_path):
    path = os.fsencode(tmp_path) + b"/caf\xe9"  # Latin-1 bytes, as a shell would pass them
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run(
        [sys.executable, "-m", "experiments.translate", b"--workdir=" + path],
        input=b"Hallo\n", capture_output=True, env=env,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr  # once: nothing at all
    assert lines[0].startswith(b"experiments.translate: error: ") and path in lines[0]


def test_evaluate_refuses_empty_files_and_warns_about_invalid_utf8(trained_workdir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_module(
        "experiments.evaluate", f"--workdir={trained_workdir}", f"--source_file={empty}",
        f"--reference_file={empty}", check=False,
    )  # fmt: skip
    assert "is empty: nothing to score" in _one_line_error(result, "experiments.evaluate")
    (tmp_path / "src.txt").write_bytes(b"Das Haus.\nDie Stra\xdfe.\n")
    (tmp_path / "ref.txt").write_bytes(b"The house.\nThe street.\n")
    result = run_module(
        "experiments.evaluate", f"--workdir={trained_workdir}", "--beam_size=1",
        f"--source_file={tmp_path / 'src.txt'}", f"--reference_file={tmp_path / 'ref.txt'}",
        f"--hypotheses={tmp_path / 'hyp.txt'}",
    )  # fmt: skip
    assert "src.txt: invalid UTF-8 replaced by U+FFFD on 1 line(s) (2)" in result.stderr.decode()
    assert len(_lines((tmp_path / "hyp.txt").read_bytes())) == 2


def test_bleu_functions_agree_with_sacrebleu():
    hyps = ["The cat sat on the mat.", "A dog barks loudly at night"]
    refs = ["The cat sat on the mat.", "The dog barks at night."]
    score, signature = metrics.sacre_bleu(hyps, refs)
    assert score == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert metrics.sacre_bleu(refs, refs)[0] == pytest.approx(100.0)
    assert "tok:13a" in signature and "case:mixed" in signature
    assert metrics.chrf(refs, refs)[0] == pytest.approx(100.0)
    # Paper-style: compound hyphens split into separate tokens before scoring.
    assert metrics.split_compounds("a well-known rule") == "a well ##AT##-##AT## known rule"
    # As t2t's perl substitution: a match takes the characters either side, so
    # in a chain the hyphen after a split one is not split.
    assert metrics.split_compounds("x-y-z") == "x ##AT##-##AT## y-z"
    assert metrics.split_compounds("a - b --") == "a - b --"
    assert metrics.paper_bleu(refs, refs, "en") == pytest.approx(100.0)
    assert metrics.paper_bleu(hyps, refs, "en") < 100.0
    # Unsmoothed, as multi-bleu.perl: no 4-gram in common scores 0.
    assert metrics.paper_bleu(["a b c d e"], ["a b c x e"], "en") == 0.0
    assert metrics.sacre_bleu(["a b c d e"], ["a b c x e"])[0] > 0.0


def test_compound_splitting_is_tensor2tensors_perl_substitution():
    """split_compounds against the very perl command of t2t's get_ende_bleu.sh
    (perl is part of every Debian system)."""
    lines = [
        "x-y-z", "x-y-z-w", "a--b", "--", "a - b --", "e-mail-Adresse", "-a", "a-", "Rock-'n'-Roll",
        "well-known rich-text format", "##AT##-##AT##", "Nord-Süd-Gefälle 2-3",
        "a-ü-b", "O-Ä-Strecke", "Schlag-à-la",  # a letter of two bytes between hyphens
    ]  # fmt: skip
    perl = subprocess.run(  # as the script runs it: no -C, so perl reads bytes
        ["perl", "-ple", r"s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, check=True,
        encoding="utf-8", env={k: v for k, v in os.environ.items() if k != "PERL_UNICODE"},
    )  # fmt: skip
    assert perl.stdout.splitlines() == [metrics.split_compounds(line) for line in lines]
