"""Text-to-image models end to end: the cross-attention and the caption path checked against formulas
written here, the vocabulary, exact resume with either caption source, `sample --prompt/--prompts`
(names, PNG records, classifier-free guidance in closed form, --from-png), the refusals, and a frozen
CLIP text encoder. Models are tiny (16x16 images, a 4x4 token grid) so the file runs in seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcli.files.checkpoint import load_model, save_model
from diffcli.cli import app
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.files.images import read_png_text
from diffcli.models.dit import CrossAttention, DiT, ModelConfig, state_dict_shapes
from diffcli.models.text import PAD, UNK, TextSpec, Vocabulary, words
from diffcli.validate import Invalid

runner = CliRunner()

CAPTIONS = ["a red square", "a blue circle", "a red circle on a blue background", "a blue square",
            "a red square", "a blue circle"]
VOCAB = sorted({w for c in CAPTIONS for w in c.split()})  # the captions' words, by hand: 7 of them
LONGEST = max(len(c.split()) for c in CAPTIONS)  # 7 words
TRAIN = ["--model", "DiT-T/4", "--resolution", "16", "--batch-size", "4", "--warmup-steps", "1",
         "--sample-every", "0", "--checkpoint-every", "2", "--device", "cpu", "--threads", "1"]
SAMPLE = ["--steps", "4", "--device", "cpu", "--threads", "1"]


def diffcli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, *words_: str) -> str:
    lines = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for w in words_:
        assert w in lines[0], lines[0]
    return lines[0]


def pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.tobytes()


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(x) for x in stdout.splitlines()]


def captioned_folder(root: Path, layout: str = "sidecar", column: str = "text") -> Path:
    """Six 16x16 noise images (seeded) with CAPTIONS, as .txt sidecars or a metadata.jsonl whose
    `column` holds them (and whose "text" column, if that is another, holds other words)."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    records = []
    for i, text in enumerate(CAPTIONS):
        px = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(px.numpy(), "RGB").save(root / f"img{i}.png")
        if layout == "sidecar":
            (root / f"img{i}.txt").write_text(text + "\n")
        else:
            records.append({"file_name": f"img{i}.png", "text": "decoy words never trained", column: text})
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def text_config(**overrides) -> ModelConfig:
    base = dict(image_height=16, image_width=16, in_channels=3, patch_size=4, hidden_size=32, depth=2, num_heads=2,
                text_encoder="builtin", context_dim=32, text_length=LONGEST, text_vocab=len(VOCAB) + 1, text_depth=1)
    return ModelConfig(**{**base, **overrides})


# --------------------------------------------------------------------------------------------------
# Numbers: cross-attention and the caption path
# --------------------------------------------------------------------------------------------------


def naive_cross_attention(m: CrossAttention, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, per head: softmax(q k^T / sqrt(d)) over the unmasked keys only, in float64."""
    x, ctx = x.double(), ctx.double()
    B, N, D = x.shape
    h = m.num_heads
    d = D // h
    q = x @ m.q.weight.double().T + m.q.bias.double()  # (B, N, D)
    kv = ctx @ m.kv.weight.double().T + m.kv.bias.double()  # (B, L, 2D): keys, then values
    k, v = kv[..., :D], kv[..., D:]
    out = torch.zeros(B, N, D, dtype=torch.float64)
    for b in range(B):
        keep = mask[b].nonzero().flatten()
        for j in range(h):
            cols = slice(j * d, (j + 1) * d)
            scores = q[b, :, cols] @ k[b, keep, cols].T / math.sqrt(d)  # (N, kept)
            out[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, keep, cols]
    return out @ m.proj.weight.double().T + m.proj.bias.double()


def test_cross_attention_is_masked_softmax_attention():
    torch.manual_seed(0)
    m = CrossAttention(16, 4)
    for p in m.parameters():  # proj is zeroed in a DiT; here everything is random
        torch.nn.init.normal_(p, std=0.3)
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        got = m(x, ctx, mask)
    assert got.shape == (3, 5, 16)
    assert (got.double() - naive_cross_attention(m, x, ctx, mask)).abs().max().item() < 1e-5
    # the masked keys have no influence at all: other numbers there, the same output
    other = torch.where(mask[..., None], ctx, torch.randn(3, 6, 16) * 100)
    with torch.no_grad():
        assert torch.allclose(m(x, other, mask), got, atol=1e-6)
        # while an unmasked key does change it
        changed = ctx.clone()
        changed[0, 1] += 1
        assert (m(x, changed, mask)[0] - got[0]).abs().max() > 1e-3


@pytest.fixture(scope="module", params=[False, True], ids=["cross", "pooled"])
def text_dit(request) -> DiT:
    """A builtin text DiT whose every weight is re-drawn (the zeroed output layers included), with
    and without the pooled caption in adaLN."""
    torch.manual_seed(1)
    model = DiT(text_config(long_skip=True, depth=3, text_pooled=request.param))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_text_dit_null_caption_and_inference_path(text_dit):
    cfg = text_dit.config
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([3.0, 250.0, 600.0, 999.0])
    vocab = Vocabulary(tuple(VOCAB))
    y = vocab.rows(["a red square", None, "a blue circle on a red background", "blue"], cfg.text_length)
    assert y.dtype == torch.long and y[1].eq(PAD).all()
    null = torch.full((4, cfg.text_length), PAD, dtype=torch.long)

    out = text_dit(x, t, y)  # autograd on: the reference path
    assert out.requires_grad and out.abs().mean() > 0.05
    with torch.no_grad():
        fast = text_dit(x, t, y)
        none = text_dit(x, t, None)
        nulls = text_dit(x, t, null)
    assert (fast - out).abs().max().item() < 1e-5  # the no-grad CPU path computes the same numbers
    assert torch.equal(none, nulls)  # y=None is the null caption
    assert torch.allclose(fast[1], nulls[1], atol=1e-5)  # a null row inside a batch of captions
    for i in (0, 2, 3):  # a caption changes the output
        assert (fast[i] - nulls[i]).abs().max() > 1e-2
    # chunked no-grad batches (2-D y sliced with x) give the same numbers
    text_dit.no_grad_chunk_tokens = cfg.num_tokens  # one image per chunk
    try:
        with torch.no_grad():
            assert (text_dit(x, t, y) - out).abs().max().item() < 1e-5
    finally:
        del text_dit.no_grad_chunk_tokens

    # the learned null caption replaces an all-PAD row, and only that row
    saved = text_dit.caption_embedder.null.detach().clone()
    with torch.no_grad():
        text_dit.caption_embedder.null.add_(1.0)
        moved = text_dit(x, t, y)
        text_dit.caption_embedder.null.copy_(saved)
    assert (moved[1] - fast[1]).abs().max() > 1e-2
    assert torch.allclose(moved[[0, 2, 3]], fast[[0, 2, 3]], atol=1e-6)


@pytest.mark.parametrize("overrides", [
    {},
    {"long_skip": True, "depth": 3, "text_depth": 2, "learn_sigma": True},
    {"text_encoder": "clip", "context_dim": 24, "text_length": 16, "text_vocab": 0, "text_depth": 0},
    {"text_pooled": True},
    {"text_encoder": "clip", "context_dim": 24, "text_length": 16, "text_vocab": 0, "text_depth": 0, "text_pooled": True},
], ids=["builtin", "builtin-skip", "clip", "builtin-pooled", "clip-pooled"])
def test_state_dict_shapes_match_the_built_text_model(overrides):
    cfg = text_config(**overrides)
    built = [(k, tuple(v.shape)) for k, v in DiT(cfg).state_dict().items()]
    assert list(state_dict_shapes(cfg).items()) == built  # names, shapes and order
    assert any(k.startswith("blocks.0.cross_attn.") for k, _ in built)
    assert any(k.startswith("text_encoder.") for k, _ in built) == (cfg.text_encoder == "builtin")
    assert any(k.startswith("caption_pool.") for k, _ in built) == cfg.text_pooled


def _random_text_dit(pooled: bool) -> DiT:
    """Every weight drawn, then the cross-attention outputs zeroed again: the caption can reach the
    output only through the pooled path."""
    torch.manual_seed(4)
    model = DiT(text_config(text_pooled=pooled)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        for b in model.blocks:
            b.cross_attn.proj.weight.zero_()
            b.cross_attn.proj.bias.zero_()
    return model


@pytest.mark.parametrize("pooled", [False, True])
def test_pooled_caption_joins_the_timestep_in_adaln(pooled):
    """The condition every block's adaLN reads is t_emb + the label row + caption_pool(the mean of the
    caption tokens that are not padding), computed here token by token in float64; without the pooled
    path it is the timestep's alone."""
    vocab = Vocabulary(tuple(VOCAB))
    model = _random_text_dit(pooled)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([400.0, 400.0, 900.0])
    y = vocab.rows(["a red square", "a blue circle on a red background", None], model.config.text_length)
    seen = []
    hook = model.blocks[0].adaLN_modulation.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        out = model(x[[0, 0, 0]], t, y)
        ctx, keep = model.caption_embedder(*model.text_encoder(y))
        expected = (model.t_embedder(t) + model.y_embedder.table.weight[0]).double()
        if pooled:
            means = torch.stack([ctx[i, keep[i]].double().mean(0) for i in range(3)])
            expected += means @ model.caption_pool.weight.double().T + model.caption_pool.bias.double()
    hook.remove()
    assert keep.sum(1).tolist() == [3, 7, 1]  # padding masked out; the null caption is one token
    assert (seen[0].double() - expected).abs().max().item() < 1e-5
    # two captions at the same noise level: the condition, and so (cross-attention being zero) the
    # output, differ only when the caption is pooled into it
    assert (seen[0][0] - seen[0][1]).abs().max().item() > 1e-3 if pooled else torch.equal(seen[0][0], seen[0][1])
    assert ((out[0] - out[1]).abs().max().item() > 1e-3) == pooled


def test_text_pooled_is_recorded_only_when_on_and_old_runs_resume_without_it():
    from diffcli.training.loop import _pooled_text
    from diffcli.training.rundir import Resumed

    assert "text_pooled" not in text_config().to_dict()  # a text model file of before the field reads alike
    assert text_config(text_pooled=True).to_dict()["text_pooled"] is True
    assert ModelConfig.from_dict(text_config().to_dict()).text_pooled is False
    with pytest.raises(Invalid, match="text_pooled"):  # no pooled caption without a caption
        ModelConfig.from_dict({**ModelConfig().to_dict(), "text_pooled": True})
    state = {"w": torch.zeros(1)}
    assert _pooled_text(Resumed()) is True  # a new run
    assert _pooled_text(Resumed(Path("s"), 5, state, {"model_config": json.dumps(text_config().to_dict())})) is False
    assert _pooled_text(Resumed(Path("s"), 5, state,
                                {"model_config": json.dumps(text_config(text_pooled=True).to_dict())})) is True


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def test_vocabulary_is_deterministic_and_encodes_with_pad_and_unk():
    import random

    shuffled = CAPTIONS + [None]
    random.Random(3).shuffle(shuffled)
    a, b = Vocabulary.build(CAPTIONS + [None]), Vocabulary.build(shuffled)
    assert a == b and list(a.words) == VOCAB and a.size == len(VOCAB) + 1
    # the most frequent words are kept, ties alphabetically: "a" x7, "blue" x4, then "circle" and "red" x3
    assert Vocabulary.build(CAPTIONS, max_size=3).words == ("a", "blue", "circle")
    assert Vocabulary.build(CAPTIONS, max_size=4).words == ("a", "blue", "circle", "red")

    warnings: list[str] = []
    row = a.encode("A  Red square", 5, warn=warnings.append)
    assert row == [VOCAB.index("a") + 1, VOCAB.index("red") + 1, VOCAB.index("square") + 1, PAD, PAD]
    assert warnings == []
    row = a.encode("a red zebra square", 3, warn=warnings.append)  # 4 words into 3: cut, with a warning
    assert row == [VOCAB.index("a") + 1, VOCAB.index("red") + 1, UNK]
    assert len(warnings) == 2
    assert "4 words" in warnings[0] and "first 3" in warnings[0]
    assert "zebra" in warnings[1]  # unknown words are named
    assert a.encode("zebra", 2) == [UNK, PAD]  # no callback: the same row, silently
    rows = a.rows(["", None, "blue"], 2)
    assert rows.tolist() == [[PAD, PAD], [PAD, PAD], [VOCAB.index("blue") + 1, PAD]]  # "" is the null caption
    assert words("Red,  square!") == ["red", ",", "square", "!"]


@pytest.mark.parametrize("value, size, match", [
    (["a", "b"], 4, "list of 3 words"),
    ("a b", 3, "list of 2 words"),
    (["a", "a"], 3, "twice"),
    (["a", "b c"], 3, "printable"),
    (["a", "tab\t"], 3, "printable"),
    (["a", ""], 3, "printable"),
    (["a", 5], 3, "printable"),
])
def test_vocabulary_from_json_refuses(value, size, match):
    with pytest.raises(Invalid, match=match):
        Vocabulary.from_json(value, size)
    assert Vocabulary.from_json(["a", "b"], 3).words == ("a", "b")


# --------------------------------------------------------------------------------------------------
# Training: the log, the model file, the preview prompts, exact resume with either caption source
# --------------------------------------------------------------------------------------------------


def train(data: Path, run: Path, steps: int, *extra: str):
    return diffcli("train", data, "--out", run, *TRAIN, "--steps", steps, *extra)


@pytest.mark.parametrize("layout", ["sidecar", "jsonl"])
def test_train_and_resume_exactly(tmp_path, layout):
    extra = ["--caption-dropout", "0.5", "--flip"] + (["--caption-column", "caption"] if layout == "jsonl" else [])
    data = captioned_folder(tmp_path / "data", layout, column="caption")
    straight, split = tmp_path / "straight", tmp_path / "split"
    preview = ["--sample-every", "4"] if layout == "sidecar" else []
    r = train(data, straight, 4, *extra, *preview)
    assert r.exit_code == 0, r.output
    assert f"captions: {len(CAPTIONS)} of {len(CAPTIONS)} images" in r.stderr
    assert f"text: {len(VOCAB)} words in the vocabulary, {LONGEST} tokens per caption" in r.stderr

    first = train(data, split, 2, *extra)
    assert first.exit_code == 0, first.output
    second = train(data, split, 4, *extra, "--resume", "auto")
    assert second.exit_code == 0, second.output
    assert "resum" in second.stderr and "step 2" in second.stderr

    a, b = load_model(straight / "model.safetensors"), load_model(split / "model.safetensors")
    assert a.config.text_encoder == "builtin" and a.config.text_length == LONGEST
    assert a.config.text_vocab == len(VOCAB) + 1 and a.config.text_depth == 2 and a.config.num_classes == 0
    assert list(a.text.vocabulary.words) == VOCAB  # the caption column's words, not the decoy "text" column's
    assert a.text == b.text
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k
    assert sa["blocks.0.cross_attn.proj.weight"].abs().sum() > 0  # the zero-initialised text path has trained

    if layout == "sidecar":
        # a new word in the captions: another vocabulary, so the run cannot resume on it
        (data / "img0.txt").write_text("a green square\n")
        r = train(data, split, 6, *extra)
        assert r.exit_code == 4
        one_error_line(r, "cannot resume", "text_vocab")
        assert not (split / "checkpoints" / "step_0000006.safetensors").exists()

    if layout == "sidecar":  # the preview grid, and its prompts beside it: one line per row
        grid = straight / "samples" / "step_0000004.png"
        prompts = grid.with_suffix(".txt").read_text().splitlines()
        assert prompts == list(dict.fromkeys(CAPTIONS))
        with Image.open(grid) as im:
            rows = round(im.height / (im.width / 4))  # 4 images per prompt
        assert rows == len(prompts)


def test_caption_tokens_caps_the_row_and_warns(tmp_path):
    data = captioned_folder(tmp_path / "data")
    r = train(data, tmp_path / "run", 1, "--caption-tokens", "3", "--text-depth", "1")
    assert r.exit_code == 0, r.output
    assert f"text: {len(VOCAB)} words in the vocabulary, 3 tokens per caption" in r.stderr
    assert "warning: 1 caption(s) have more than --caption-tokens 3 words" in r.stderr
    mf = load_model(tmp_path / "run" / "model.safetensors")
    assert mf.config.text_length == 3 and mf.config.text_depth == 1


def test_text_encoder_none_and_builtin_without_captions(tmp_path, toy_image_folder):
    data = captioned_folder(tmp_path / "data")
    r = train(data, tmp_path / "plain", 1, "--text-encoder", "none")
    assert r.exit_code == 0, r.output
    assert "captions:" not in r.stderr
    mf = load_model(tmp_path / "plain" / "model.safetensors")
    assert not mf.config.text and mf.text is None

    bare = toy_image_folder(classes=(), per_class=3, size=16)
    out = tmp_path / "run"
    r = train(bare, out, 1, "--text-encoder", "builtin")
    assert r.exit_code == 4
    one_error_line(r, "no image", "has a caption")
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


def test_resume_without_caption_dropout(tmp_path):
    data = captioned_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert train(data, run, 2, "--caption-dropout", "0").exit_code == 0
    r = diffcli("info", run / "checkpoints" / "step_0000002.safetensors")
    assert r.exit_code == 0, r.output
    r = train(data, run, 4, "--caption-dropout", "0")
    assert r.exit_code == 0, r.output
    assert "resuming" in r.stderr


def test_captions_in_class_folders_make_a_usable_text_model(tmp_path):
    data = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for name in ("blue", "red"):
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()).save(
                data / name / f"{i}.png")
            (data / name / f"{i}.txt").write_text(f"a {name} square")
    run = tmp_path / "run"
    r = train(data, run, 1)
    assert r.exit_code == 0, r.output
    assert "captions: 4 of 4 images" in r.stderr
    r = diffcli("sample", "-c", run / "model.safetensors", "--prompt", "a red square", "-n", 1, "-o", tmp_path / "s",
                *SAMPLE)
    assert r.exit_code == 0, r.output


def test_refused_text_run_writes_nothing(tmp_path, toy_image_folder):
    bare = toy_image_folder(classes=(), per_class=3, size=16)
    out = tmp_path / "run"
    r = train(bare, out, 1, "--text-encoder", "builtin")
    assert r.exit_code == 4
    assert not out.exists() or list(out.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_dit) -> dict[str, Path]:
    """text: a builtin text model over CAPTIONS' words, weights perturbed (the text path is not zero),
    guidance 2 stored; cls: a class model; uncond: an unconditional one."""
    folder = tmp_path_factory.mktemp("models")
    paths = {k: folder / f"{k}.safetensors" for k in ("text", "cls", "uncond")}
    spec = TextSpec("builtin", Vocabulary(tuple(VOCAB)))
    save_model(paths["text"], make_dit(text_config(), seed=3, scale=0.1), NoiseSchedule("cosine", 1000), "v", [],
               sampling={"guidance": 2.0}, text=spec)
    save_model(paths["cls"], make_dit(num_classes=2, seed=4), NoiseSchedule("cosine", 1000), "v", ["red", "blue"],
               sampling={"guidance": 2.0})
    save_model(paths["uncond"], make_dit(seed=5), NoiseSchedule("cosine", 1000), "v", [])
    return paths


def test_prompt_writes_n_images_with_the_prompt_recorded(tmp_path, models):
    out = tmp_path / "s"
    r = diffcli("sample", "-c", models["text"], "--prompt", "a red square", "--negative-prompt", "blue circle",
                "--seed", 10, "-o", out, "--json", *SAMPLE)
    assert r.exit_code == 0, r.output
    images = [x for x in json_lines(r.stdout) if x["kind"] == "image"]
    assert len(images) == 4  # -n defaults to 4 for --prompt
    assert [(x["prompt"], x["prompt_index"], x["negative_prompt"], x["seed"]) for x in images] == [
        ("a red square", 0, "blue circle", s) for s in (10, 11, 12, 13)]
    assert sorted(p.name for p in out.iterdir()) == [Path(x["path"]).name for x in images]
    text = read_png_text(images[2]["path"])
    lines = text["parameters"].split("\n")
    assert lines[0] == "a red square" and lines[1] == "Negative prompt: blue circle"
    assert lines[2].startswith("Steps: 4, ") and "Seed: 12" in lines[2] and len(lines) == 3
    record = json.loads(text["diffcli"])
    assert (record["prompt"], record["prompt_index"], record["negative_prompt"]) == ("a red square", 0, "blue circle")
    assert "class" not in record or record["class"] is None
    with Image.open(images[0]["path"]) as im:
        assert im.size == (16, 16) and im.mode == "RGB"


def test_prompts_file_and_name_template(tmp_path, models):
    prompts = tmp_path / "prompts.txt"
    long = "a red square on a blue background " * 3  # 21 words, 98 characters; the model reads 7
    prompts.write_text(f"a red square\n\n   \nA Blue  circle, on red!\n{long}\n")
    out = tmp_path / "s"
    r = diffcli("sample", "-c", models["text"], "--prompts", prompts, "-n", 2, "--seed", 20, "-o", out,
                "--name", "{prompt_index}-{prompt}-{seed}.png", "--json", *SAMPLE)
    assert r.exit_code == 0, r.output
    cut = "a_red_square_on_a_blue_background_a_red_square_on_a_blue_bac"
    assert len(cut) == 60
    expected = [f"0-a_red_square-20.png", "0-a_red_square-21.png", "1-A_Blue_circle_on_red-22.png",
                "1-A_Blue_circle_on_red-23.png", f"2-{cut}-24.png", f"2-{cut}-25.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    images = [x for x in json_lines(r.stdout) if x["kind"] == "image"]
    assert [Path(x["path"]).name for x in images] == expected
    assert [x["prompt_index"] for x in images] == [0, 0, 1, 1, 2, 2]
    assert images[2]["prompt"] == "A Blue  circle, on red!" and "negative_prompt" not in images[2]
    assert images[4]["prompt"] == long.strip()
    # the long prompt and the unseen punctuation are warnings, each on one line, not failures
    warnings = [x for x in r.stderr.splitlines() if x.startswith("warning:")]
    assert any("21 words" in w and "first 7" in w for w in warnings), r.stderr
    assert any("never saw" in w and "," in w and "!" in w for w in warnings), r.stderr
    # without -n: one image per line
    r = diffcli("sample", "-c", models["text"], "--prompts", prompts, "--seed", 20, "-o", tmp_path / "one", *SAMPLE)
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "one").iterdir())) == 3


def guided(tmp_path: Path, models, name: str, g: float, *options: str) -> bytes:
    out = tmp_path / name
    r = diffcli("sample", "-c", models["text"], "-n", 2, "--seed", 7, "--guidance", g, "-o", out, *options, *SAMPLE)
    assert r.exit_code == 0, r.output
    return b"".join(pixels(p) for p in sorted(out.iterdir()))


def test_classifier_free_guidance_in_closed_form(tmp_path, models):
    # out = uncond + w (cond - uncond): with cond == uncond every scale gives the same image
    assert guided(tmp_path, models, "e1", 1, "--prompt", "") == guided(tmp_path, models, "e5", 5, "--prompt", "")
    same = ("--prompt", "a red square", "--negative-prompt", "a red square")
    assert guided(tmp_path, models, "n1", 1, *same) == guided(tmp_path, models, "n4", 4, *same)
    # a real prompt against the null caption: the scale matters
    p1 = guided(tmp_path, models, "p1", 1, "--prompt", "a red square")
    assert p1 == guided(tmp_path, models, "n1b", 1, "--prompt", "a red square")  # deterministic
    assert p1 != guided(tmp_path, models, "p4", 4, "--prompt", "a red square")
    # and the negative prompt matters where it replaces the null caption
    assert guided(tmp_path, models, "p4b", 4, "--prompt", "a red square") != \
        guided(tmp_path, models, "neg4", 4, "--prompt", "a red square", "--negative-prompt", "blue")


@pytest.mark.parametrize("prompt, negative", [("a red square", "blue circle"), ("a blue circle", None), ("", None)],
                         ids=["negative", "plain", "null"])
def test_from_png_reproduces_a_text_image(tmp_path, models, prompt, negative):
    first = tmp_path / "first"
    neg = ["--negative-prompt", negative] if negative else []
    r = diffcli("sample", "-c", models["text"], "--prompt", prompt, *neg, "-n", 2, "--seed", 30, "-o", first, *SAMPLE)
    assert r.exit_code == 0, r.output
    png = first / "31-0001.png"
    assert json.loads(read_png_text(png)["diffcli"])["prompt"] == prompt
    again = diffcli("sample", "-c", models["text"], "--from-png", png, "-o", tmp_path / "again",
                    "--device", "cpu", "--threads", "1")
    assert again.exit_code == 0, again.output
    (made,) = (tmp_path / "again").iterdir()
    assert made.read_bytes() == png.read_bytes()


def test_from_png_of_a_prompts_file_image_has_the_same_pixels(tmp_path, models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    r = diffcli("sample", "-c", models["text"], "--prompts", prompts, "--seed", 40, "-o", tmp_path / "first", *SAMPLE)
    assert r.exit_code == 0, r.output
    png = tmp_path / "first" / "41-0001.png"  # the second line's image
    again = diffcli("sample", "-c", models["text"], "--from-png", png, "-o", tmp_path / "again", "--device", "cpu")
    assert again.exit_code == 0, again.output
    (made,) = (tmp_path / "again").iterdir()
    assert pixels(made) == pixels(png)
    assert json.loads(read_png_text(made)["diffcli"])["prompt"] == "a blue circle"


def test_from_png_of_a_prompts_file_image_is_byte_identical(tmp_path, models):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    r = diffcli("sample", "-c", models["text"], "--prompts", prompts, "--seed", 40, "-o", tmp_path / "first", *SAMPLE)
    assert r.exit_code == 0, r.output
    png = tmp_path / "first" / "41-0001.png"
    again = diffcli("sample", "-c", models["text"], "--from-png", png, "-o", tmp_path / "again", "--device", "cpu")
    assert again.exit_code == 0, again.output
    (made,) = (tmp_path / "again").iterdir()
    assert made.read_bytes() == png.read_bytes()


# --------------------------------------------------------------------------------------------------
# Refusals: the exit code, one line, nothing written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, options, words_", [
    ("cls", ["--prompt", "a cat"], ["--prompt", "class model", "--class"]),
    ("cls", ["--negative-prompt", "a cat"], ["--negative-prompt", "class model"]),
    ("uncond", ["--prompt", "a cat"], ["--prompt", "unconditional"]),
    ("uncond", ["--prompts", "PROMPTS"], ["--prompts", "unconditional"]),
    ("text", ["--class", "red"], ["--class", "text-to-image"]),
    ("text", [], ["--prompt", "--prompts"]),
    ("text", ["--negative-prompt", "blue"], ["--prompt"]),
    ("text", ["--prompt", "a", "--prompts", "PROMPTS"], ["--prompt", "--prompts"]),
    ("text", ["--prompt", "a", "--name", "{prompt}-{class}-{seed}.png", "-n", "1"], []),
    ("cls", ["--class", "red", "--name", "{prompt}-{seed}.png"], ["{prompt}", "text-to-image"]),
], ids=["prompt-class", "negative-class", "prompt-uncond", "prompts-uncond", "class-text", "no-prompt",
        "negative-only", "both", "ok-template", "prompt-field-class"])
def test_usage_errors_exit_2(tmp_path, models, model, options, words_):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    out = tmp_path / "out"
    options = [str(prompts) if o == "PROMPTS" else o for o in options]
    r = diffcli("sample", "-c", models[model], "-o", out, *options, *SAMPLE)
    if not words_:
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 2, r.output
    one_error_line(r, *words_)
    assert r.stdout == "" and not out.exists()


def test_prompts_file_missing_or_not_utf8_exit_4(tmp_path, models):
    out = tmp_path / "out"
    missing = tmp_path / "nope.txt"
    r = diffcli("sample", "-c", models["text"], "--prompts", missing, "-o", out, *SAMPLE)
    assert r.exit_code == 4
    one_error_line(r, str(missing))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a red square\n\na blue \xff circle\n")
    r = diffcli("sample", "-c", models["text"], "--prompts", bad, "-o", out, *SAMPLE)
    assert r.exit_code == 4
    one_error_line(r, str(bad), "line 3", "UTF-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    r = diffcli("sample", "-c", models["text"], "--prompts", blank, "-o", out, *SAMPLE)
    assert r.exit_code == 4
    one_error_line(r, str(blank), "no prompt")
    assert not out.exists()


def test_info_shows_the_text_encoder(models):
    r = diffcli("info", models["text"], "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["model_kind"] == "text-to-image"
    assert info["text_encoder"] == {"kind": "builtin", "tokens": LONGEST, "width": 32, "words": len(VOCAB),
                                    "layers": 1, "pooled": False}
    r = diffcli("info", models["text"])
    assert r.exit_code == 0, r.output
    assert "Text" in r.stdout and f"builtin, 1 layers, {len(VOCAB)} words" in r.stdout
    assert f"{LONGEST} per prompt" in r.stdout
    assert "cross-attention" in r.stdout and "pooled" not in r.stdout


# --------------------------------------------------------------------------------------------------
# A frozen CLIP text encoder
# --------------------------------------------------------------------------------------------------


def make_clip(folder: Path, seed: int) -> Path:
    """A tiny random CLIP text model folder as tests/test_clip.py builds it, named tiny-clip."""
    transformers = pytest.importorskip("transformers")
    from test_clip import TEXT_CONFIG, write_tokenizer

    folder.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer(folder)
    return folder


def test_clip_train_then_sample_needs_the_same_folder(tmp_path):
    pytest.importorskip("transformers")
    import hashlib

    clip = make_clip(tmp_path / "a" / "tiny-clip", seed=0)
    other = make_clip(tmp_path / "b" / "tiny-clip", seed=1)  # same name and shapes, other weights
    data = captioned_folder(tmp_path / "data")
    run = tmp_path / "run"
    r = train(data, run, 2, "--text-encoder", clip)
    assert r.exit_code == 0, r.output
    assert "text: CLIP text encoder" in r.stderr
    model = run / "model.safetensors"
    mf = load_model(model)
    sha = hashlib.sha256((clip / "model.safetensors").read_bytes()).hexdigest()
    assert (mf.config.text_encoder, mf.config.context_dim, mf.config.text_length) == ("clip", 32, 16)
    assert (mf.text.folder, mf.text.sha256) == ("tiny-clip", sha)
    assert not any(k.startswith("text_encoder.") for k in mf.model.state_dict())  # CLIP is not in the file

    out = tmp_path / "s"
    r = diffcli("sample", "-c", model, "--prompt", "a red square", "-n", 1, "-o", out, *SAMPLE)
    assert r.exit_code == 2
    one_error_line(r, "'tiny-clip'", "--text-encoder")
    assert not out.exists()
    r = diffcli("sample", "-c", model, "--prompt", "a red square", "-n", 1, "-o", out, "--text-encoder", other, *SAMPLE)
    assert r.exit_code == 4
    one_error_line(r, str(other))
    assert not out.exists()
    r = diffcli("sample", "-c", model, "--prompt", "a red square", "-n", 2, "--seed", 1, "-o", out,
                "--text-encoder", clip, "--json", *SAMPLE)
    assert r.exit_code == 0, r.output
    images = [x for x in json_lines(r.stdout) if x["kind"] == "image"]
    assert [x["prompt"] for x in images] == ["a red square"] * 2
    r = diffcli("info", model, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text_encoder"] == {"kind": "clip", "tokens": 16, "width": 32, "folder": "tiny-clip",
                                                    "sha256": sha, "pooled": True}  # a new run pools its caption
