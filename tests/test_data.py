"""Data layer: PAPO/ViRL file formats, bad rows, resumable iteration, processor, tiny tokenizer."""
import base64
import io
import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from megatron_papo.data.dataset import DataConfig, PapoDataset, ResumableIterator, build_iterator, read_rows
from megatron_papo.data.prompts import PAPO_FORMAT_PROMPT
from megatron_papo.data.synthetic import SyntheticConfig, SyntheticShapes


def _png(h, w, seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(w, h) -> bytes:
    """A PNG that declares w x h RGB pixels and holds none: PIL reads its size, a decode fails."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _write(rows, folder, fmt) -> str:
    """Write rows as jsonl (bytes -> base64) or parquet; returns the file path."""
    path = os.path.join(folder, f"data.{fmt}")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        def enc(v):
            if isinstance(v, bytes):
                return base64.b64encode(v).decode()
            if isinstance(v, dict):
                return {k: enc(x) for k, x in v.items()}
            if isinstance(v, list):
                return [enc(x) for x in v]
            return v
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(enc(r)) + "\n")
    return path


ENCODINGS = ["bytes", "relpath", "abspath", "dict_bytes", "dict_path"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_image_encodings_load(tmp_path, fmt, encoding):
    pngs = [_png(56, 84, 1), _png(112, 56, 2)]
    os.makedirs(tmp_path / "img")
    for i, p in enumerate(pngs):
        (tmp_path / "img" / f"{i}.png").write_bytes(p)

    def image(i):
        rel = f"img/{i}.png"
        return {"bytes": pngs[i], "relpath": rel, "abspath": str(tmp_path / rel),
                "dict_bytes": {"bytes": pngs[i], "path": None}, "dict_path": {"bytes": None, "path": rel}}[encoding]

    rows = [{"problem": "<image>What is shown?", "answer": "7", "images": [image(0)]},
            {"problem": "Compare <image> and <image>.", "answer": "B", "images": [image(0), image(1)]}]
    ds = PapoDataset(DataConfig(path=_write(rows, tmp_path, fmt)))
    assert len(ds) == 2 and ds.stats.total == 0
    s0, s1 = ds[0], ds[1]
    assert (s0.sample_id, s1.sample_id) == (0, 1)
    np.testing.assert_array_equal(s0.images[0], _decode(pngs[0]))
    np.testing.assert_array_equal(s1.images[1], _decode(pngs[1]))
    assert [im.shape for im in s1.images] == [(56, 84, 3), (112, 56, 3)]
    assert s0.answer == "7" and s1.answer == "B"
    assert s0.prompt == PAPO_FORMAT_PROMPT.replace("{content}", "<image>What is shown?")
    assert "You FIRST think" in s1.prompt and "\\boxed{}" in s1.prompt
    # each <image> becomes an image part of the user turn, in order
    parts = [p["type"] for p in s1.messages[0]["content"]]
    assert parts == ["text", "image", "text", "image", "text"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bad_rows_skipped_and_counted(tmp_path, fmt):
    good = _png(56, 56)
    truncated = _png(84, 84, 3)[:200]  # header decodes, pixels do not
    (tmp_path / "ok.png").write_bytes(good)
    # one parquet column cannot mix bytes and strings: use the HF {"bytes", "path"} struct throughout
    B = lambda b: {"bytes": b, "path": None}  # noqa: E731
    P = lambda p: {"bytes": None, "path": p}  # noqa: E731
    rows = [
        {"problem": "<image>ok", "answer": "1", "images": [B(good)]},                    # 0 good
        {"problem": "<image>no answer", "answer": None, "images": [B(good)]},            # 1
        {"problem": "<image>  ", "answer": "2", "images": [B(good)]},                    # 2 empty text
        {"problem": "<image>garbage", "answer": "3", "images": [B(b"not an image at all" * 5)]},  # 3
        {"problem": "<image>tiny", "answer": "4", "images": [B(_png(20, 40))]},          # 4 too small
        {"problem": "<image>huge", "answer": "5", "images": [B(_png(28, 17000))]},       # 5 side too large
        {"problem": "<image><image>two", "answer": "6", "images": [B(good)]},            # 6 placeholder mismatch
        {"problem": "<image>truncated", "answer": "7", "images": [B(truncated)]},        # 7 fails on full decode
        {"problem": "<image>gone", "answer": "8", "images": [P("missing.png")]},          # 8 missing file
        {"problem": "<image>many pixels", "answer": "9", "images": [B(_png(300, 300))]},  # 9 > max_image_pixels
        {"problem": "no placeholder", "answer": "10", "images": [P("ok.png")]},          # 10 good: image goes first
        {"problem": "<image>a <|image_pad|> here", "answer": "11", "images": [B(good)]},  # 11 special token
    ]
    ds = PapoDataset(DataConfig(path=_write(rows, tmp_path, fmt), max_image_pixels=200 * 200))
    assert dict(ds.stats.counts) == {"missing_answer": 1, "empty_text": 1, "undecodable_image": 1,
                                     "image_too_small": 1, "image_too_large": 2,
                                     "placeholder_mismatch": 1, "missing_image": 1, "special_token": 1}
    assert ds.stats.rows["image_too_large"] == [5, 9] and ds.stats.rows["missing_answer"] == [1]
    assert ds.stats.rows["undecodable_image"] == [3] and ds.stats.rows["missing_image"] == [8]
    assert len(ds) == 3  # rows 0, 7, 10 pass the load-time checks
    # the truncated image is found on full decode: skipped by the iterator, counted once, never fatal
    it = ResumableIterator(ds, seed=0)
    ids = [s.sample_id for s in it.take(6)]
    assert sorted(set(ids)) == [0, 10] and len(ids) == 6
    assert ds.stats.rows["undecodable_image"] == [3, 7] and ds.stats.counts["undecodable_image"] == 2
    assert "row" in ds.stats.summary() and "undecodable_image=2" in ds.stats.summary()
    assert ds[2].sample_id == 10 and ds[2].prompt.startswith("<image>no placeholder")


def test_invalid_text_is_a_bad_row_not_a_crash(tmp_path, processor):
    """A lone UTF-16 surrogate (JSON "\ud800") or a line of invalid UTF-8 is one bad row, not a dead run."""
    img = base64.b64encode(_png(56, 56)).decode()
    ok = lambda problem, answer="1": json.dumps({"problem": problem, "answer": answer, "images": [img]}).encode()  # noqa: E731
    lines = [
        ok("<image>fine"),                                                   # 0 good
        b'{"problem": "<image>lone \\ud800 surrogate", "answer": "1", "images": ["' + img.encode() + b'"]}',  # 1
        b'{"problem": "<image>fine", "answer": "\\udfff", "images": ["' + img.encode() + b'"]}',               # 2
        b'{"problem": "<image>caf\xe9 in latin-1", "answer": "1", "images": ["' + img.encode() + b'"]}',        # 3
        ok("<image>also fine", "2"),                                         # 4 good
    ]
    path = tmp_path / "text.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    ds = PapoDataset(DataConfig(path=str(path)))
    assert dict(ds.stats.counts) == {"invalid_text": 3} and ds.stats.rows["invalid_text"] == [1, 2, 3]
    assert [ds[i].sample_id for i in range(len(ds))] == [0, 4]
    for i in range(len(ds)):  # what survives goes through the tokenizer (the surrogate crashed it)
        assert len(processor.encode_sample(ds[i]).input_ids) > 0


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_text_only_and_multi_image_rows_accepted(tmp_path, fmt, processor):
    pngs = [_png(56, 56, 1), _png(84, 56, 2), _png(56, 112, 3)]
    B = lambda b: {"bytes": b, "path": None}  # noqa: E731
    rows = [{"problem": "What is 2+3?", "answer": "5", "images": []},
            {"problem": "<image> vs <image> vs <image>: which is widest?", "answer": "C", "images": [B(p) for p in pngs]},
            {"problem": "Name a prime.", "answer": "7", "images": None}]
    ds = PapoDataset(DataConfig(path=_write(rows, tmp_path, fmt)))
    assert len(ds) == 3 and ds.stats.total == 0
    text, multi, text2 = ds[0], ds[1], ds[2]
    assert text.images == [] and text2.images == [] and "<image>" not in text.prompt
    assert [im.shape for im in multi.images] == [(56, 56, 3), (84, 56, 3), (56, 112, 3)]
    np.testing.assert_array_equal(multi.images[2], _decode(pngs[2]))
    enc = processor.encode_sample(text)
    assert enc.pixel_values is None and len(enc.input_ids) > 0
    assert processor.encode_sample(multi).image_grid_thw.shape == (3, 3)


def test_skip_accounting_is_visible_once(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    B = lambda b: {"bytes": b, "path": None}  # noqa: E731
    rows = [{"problem": "<image>ok", "answer": "1", "images": [B(_png(56, 56))]},
            {"problem": "<image>no answer", "answer": None, "images": [B(_png(56, 56))]},
            {"problem": "<image>truncated", "answer": "2", "images": [B(_png(84, 84, 3)[:200])]}]  # fails on decode
    path = _write(rows, tmp_path, "parquet")
    with caplog.at_level(logging.WARNING, logger="megatron_papo.data.dataset"):
        ds = PapoDataset(DataConfig(path=path))
        it = ResumableIterator(ds, seed=0)
        assert [s.sample_id for s in it.take(6)] == [0] * 6  # six epochs: the truncated row is met six times
    # the summary is a plain line on stderr (logging is never configured), printed once
    err = capsys.readouterr().err
    assert err.count("good rows") == 1 and "data.parquet: 2 good rows" in err and "missing_answer=1 (rows [1])" in err
    warned = [r.getMessage() for r in caplog.records if "row 2 skipped" in r.getMessage()]
    assert len(warned) == 1, warned  # warned once, not once per epoch
    # counts the trainer logs as metrics
    assert it.skip_metrics() == {"data/skipped_rows": 2, "data/skipped/missing_answer": 1,
                                 "data/skipped/undecodable_image": 1}
    assert ds.skip_metrics() == it.skip_metrics()
    assert ResumableIterator(SyntheticShapes(SyntheticConfig(num_samples=2))).skip_metrics() == {}
    # every rank reads the same file: only rank 0 prints the load report
    monkeypatch.setenv("RANK", "1")
    PapoDataset(DataConfig(path=path))
    assert "good rows" not in capsys.readouterr().err


def test_parquet_binary_text_is_decoded(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems = [b"What is 2+2?", "caf\u00e9 \u2014 how many?".encode(), b"bad \xff byte"]
    table = pa.table({"problem": pa.array(problems, pa.binary()), "answer": pa.array([b"4", b"3", b"1"], pa.binary())})
    pq.write_table(table, tmp_path / "bin.parquet")
    ds = PapoDataset(DataConfig(path=str(tmp_path / "bin.parquet")))
    assert dict(ds.stats.counts) == {"invalid_text": 1} and ds.stats.rows["invalid_text"] == [2]
    assert "What is 2+2?" in ds[0].prompt and ds[0].answer == "4"
    assert "caf\u00e9 \u2014 how many?" in ds[1].prompt and ds[1].answer == "3"


def test_decompression_bomb_rejected_from_its_header(tmp_path):
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # 1-bit, all black: 12 KB on disk
    bomb = buf.getvalue()  # 300 MB once decoded to RGB; under the old 1e8-pixel default
    (tmp_path / "later.png").write_bytes(_png(56, 56))
    rows = [{"problem": "<image>bomb", "answer": "1", "images": [{"bytes": bomb, "path": None}]},
            {"problem": "<image>fine for now", "answer": "2", "images": [{"bytes": None, "path": "later.png"}]}]
    ds = PapoDataset(DataConfig(path=_write(rows, tmp_path, "parquet")))
    assert dict(ds.stats.counts) == {"image_too_large": 1} and ds.stats.rows["image_too_large"] == [0] and len(ds) == 1
    # the file changes after the load-time check into one whose header declares 10000x10000 and holds no
    # pixels: load() reads the header before decoding, so this is image_too_large (a decode: undecodable_image)
    (tmp_path / "later.png").write_bytes(_png_header_only(10_000, 10_000))
    assert ds[0] is None and ds.stats.rows["image_too_large"] == [0, 1]
    # the default bound follows the processor's (see DataConfig.max_image_pixels for the factor)
    from megatron_papo.data.processor import ProcessorConfig

    assert DataConfig().max_image_pixels == 16 * ProcessorConfig().max_pixels


def test_unreadable_files_fail_with_their_name(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_rows(missing)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="corrupt.parquet"):
        PapoDataset(DataConfig(path=str(corrupt)))
    text = tmp_path / "data.csv"
    text.write_text("a,b\n")
    with pytest.raises(ValueError, match="data.csv.*parquet or .jsonl"):
        read_rows(str(text))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"problem": "x", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        read_rows(str(bad_json))
    no_col = tmp_path / "nocol.jsonl"
    no_col.write_text('{"question": "x", "answer": "1"}\n')
    with pytest.raises(ValueError, match="nocol.jsonl has no column 'problem'"):
        PapoDataset(DataConfig(path=str(no_col)))


def test_configurable_field_names(tmp_path):
    rows = [{"q": "<image>count", "gt": "3", "pics": [{"bytes": _png(56, 56), "path": None}]}]
    ds = PapoDataset(DataConfig(path=_write(rows, tmp_path, "parquet"), problem_key="q", answer_key="gt",
                                image_key="pics", prompt_template="none"))
    s = ds[0]
    assert s.prompt == "<image>count" and s.answer == "3" and s.images[0].shape == (56, 56, 3)


def test_iteration_deterministic_and_resumes_exactly():
    ds = SyntheticShapes(SyntheticConfig(num_samples=7))
    ids = lambda samples: [s.sample_id for s in samples]  # noqa: E731
    full = ids(ResumableIterator(ds, seed=3).take(23))
    assert full == ids(ResumableIterator(ds, seed=3).take(23))
    for e in range(3):  # every epoch is a permutation of all samples
        assert sorted(full[7 * e: 7 * e + 7]) == list(range(7))
    assert full[:7] != full[7:14]  # epochs are reshuffled
    assert full != ids(ResumableIterator(ds, seed=4).take(23))
    for stop in (0, 5, 7, 13):
        it = ResumableIterator(ds, seed=3)
        it.take(stop)
        state = it.state_dict()
        resumed = ResumableIterator(ds, seed=3)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
        assert ids(resumed.take(23 - stop)) == full[stop:]
    with pytest.raises(ValueError, match="does not match"):
        ResumableIterator(SyntheticShapes(SyntheticConfig(num_samples=8)), seed=3).load_state_dict(state)
    assert ids(ResumableIterator(ds, shuffle=False).take(9)) == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert ids(build_iterator(SyntheticConfig(seed=3, num_samples=7)).take(23)) == full


# ---------------------------------------------------------------- processor

@pytest.fixture(scope="module")
def processor():
    from megatron_papo.data.processor import ProcessorConfig, VLProcessor

    return VLProcessor.from_config(ProcessorConfig(min_pixels=56 * 56, max_pixels=224 * 224))


def test_image_pads_match_grid(processor):
    from megatron_papo.data.sample import Sample

    images = [np.full((56, 84, 3), 7, np.uint8), np.full((112, 112, 3), 9, np.uint8)]
    enc = processor.encode_sample(Sample(5, "<image>and<image>: same?", "no", images))
    grid = enc.image_grid_thw.tolist()
    assert grid == [[1, 4, 6], [1, 8, 8]]
    ids = enc.input_ids.tolist()
    tok = processor.tokenizer
    pad, vs, ve = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    assert ids.count(pad) == sum(t * h * w // 4 for t, h, w in grid)
    # each image is <|vision_start|> + its own pads + <|vision_end|>
    starts = [i for i, t in enumerate(ids) if t == vs]
    for start, (t, h, w) in zip(starts, grid):
        n = t * h * w // 4
        assert ids[start + 1: start + 1 + n] == [pad] * n and ids[start + 1 + n] == ve
    assert enc.pixel_values.shape == (sum(t * h * w for t, h, w in grid), 1176)
    assert enc.answer == "no" and enc.sample_id == 5
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> tokens but 1 images"):
        processor(processor.chat_text(Sample(0, "<image><image>", "x").messages), images[:1])


def _row_of_cell(py, px, gw):  # DEPENDENCY_NOTES: rows in 2x2 merge-window order
    return ((py // 2) * (gw // 2) + px // 2) * 4 + (py % 2) * 2 + (px % 2)


def test_masked_pixel_values_differ_only_in_masked_patches(processor):
    from megatron_papo.data.processor import MaskConfig
    from megatron_papo.data.sample import Sample
    from megatron_papo.ops import masking

    rng = np.random.default_rng(0)
    images = [rng.integers(1, 256, (84, 112, 3), dtype=np.uint8), rng.integers(1, 256, (56, 56, 3), dtype=np.uint8)]
    sample = Sample(11, "<image><image>Describe.", "x", images)
    mask = MaskConfig(seed=123, ratio=0.5)
    enc = processor.encode_sample(sample, mask)
    # the masked images, run through the processor as ordinary images: same tokens and grid
    masked_images = [masking.mask_raw_image(im, seed=123, sample_id=11, image_index=i, ratio=0.5)
                     for i, im in enumerate(images)]
    plain = processor.encode_sample(Sample(11, sample.prompt, "x", masked_images))
    assert np.array_equal(plain.input_ids, enc.input_ids) and np.array_equal(plain.image_grid_thw, enc.image_grid_thw)
    assert np.array_equal(plain.pixel_values, enc.masked_pixel_values)
    # independent reference: the rows that change are exactly the patches whose raw pixels changed
    offset, expected = 0, []
    for im, m, (t, gh, gw) in zip(images, masked_images, enc.image_grid_thw.tolist()):
        changed = (im != m).any(-1).reshape(gh, 14, gw, 14).any((1, 3))
        expected += [offset + _row_of_cell(py, px, gw) for py, px in zip(*np.nonzero(changed))]
        offset += t * gh * gw
    differing = (enc.pixel_values != enc.masked_pixel_values).any(1).nonzero().flatten().tolist()
    assert sorted(expected) == differing and 0 < len(differing) < enc.pixel_values.shape[0]
    # deterministic: same seed -> same mask; another sample id -> another mask
    assert np.array_equal(processor.encode_sample(sample, mask).masked_pixel_values, enc.masked_pixel_values)
    other = processor.encode_sample(Sample(12, sample.prompt, "x", images), mask)
    assert not np.array_equal(other.masked_pixel_values, enc.masked_pixel_values)
    # a resized image (100x150 raw): grid and tokens still identical, only pixel values differ
    odd = rng.integers(1, 256, (100, 150, 3), dtype=np.uint8)
    a = processor.encode_sample(Sample(1, "<image>", "x", [odd]), mask)
    assert a.masked_pixel_values.shape == a.pixel_values.shape and not np.array_equal(a.masked_pixel_values, a.pixel_values)


def test_processor_from_model_folder(tmp_path, processor):
    from megatron_papo.data.processor import ProcessorConfig, VLProcessor

    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    loaded = VLProcessor.from_config(ProcessorConfig(tokenizer_path=str(tmp_path), min_pixels=56 * 56, max_pixels=56 * 56))
    img = np.zeros((112, 112, 3), np.uint8)
    encoded = loaded(loaded.chat_text([{"role": "user", "content": [{"type": "image"}]}]), [img])
    assert encoded.image_grid_thw.tolist() == [[1, 4, 4]]
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        VLProcessor.from_config(ProcessorConfig(tokenizer_path=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from megatron_papo.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def test_tokenizer_special_ids_match_tiny_flavor(tiny_tokenizer):
    from megatron_papo.data.tokenizer import special_token_ids
    from megatron_papo.models.qwen2_5_vl.flavors import get_flavor

    tiny = get_flavor("tiny")
    ids = special_token_ids(tiny_tokenizer)
    for name, value in ids.as_config_overrides().items():
        assert getattr(tiny, name) == value, name
    assert ids.vocab_size == len(tiny_tokenizer) <= tiny.vocab_size
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_start|>") == 1022
    assert tiny_tokenizer.eos_token_id == tiny.eos_token_id
    # every ordinary id is below the specials
    text = "<think>two red circles</think> \\boxed{\\frac{1}{2}} 12345 ünïcode"
    ordinary = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max(ordinary) < 1016 and tiny_tokenizer.decode(ordinary) == text


def test_tokenizer_round_trip_and_deterministic(tmp_path, tiny_tokenizer):
    from megatron_papo.data.tokenizer import load_tokenizer, save_tiny_tokenizer

    save_tiny_tokenizer(tmp_path / "a")
    save_tiny_tokenizer(tmp_path / "b")
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    loaded = load_tokenizer(tmp_path / "a")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert len(loaded) == len(tiny_tokenizer)
    # a model folder whose chat template sits with the processor (chat_template.json) instead
    (tmp_path / "a" / "chat_template.jinja").unlink()
    (tmp_path / "a" / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert load_tokenizer(tmp_path / "a").apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi!"


def test_chat_template_renders_image_block(tiny_tokenizer):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    i = ids.index(1018)
    assert ids[i: i + 3] == [1018, 1020, 1019]
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tiny_tokenizer.apply_chat_template(own_system, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")
