"""emoji-clip v2's training world: Iconify emoji and icon sets, their mapping onto the Unicode
catalogue, rasterising, the hold-outs, and resumable training.

Needs the npm packages that .ci/setup installs under $CURATION_NPM_PREFIX (`@iconify-json/*`) and
`resvg-py`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from curation.emoji import catalog, iconify, render

TINY_VISION = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}


@pytest.fixture(scope="module")
def full_catalog():
    return catalog.load_catalog()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_pinned_set_is_installed_at_its_version():
    for prefix, version in {**iconify.EMOJI_SETS, **iconify.ICON_SETS}.items():
        iconset = iconify.load_set(prefix)
        assert iconset.version == version and len(iconset.icons) > 500, prefix
        assert iconset.license != "?"
    with pytest.raises(ValueError, match="Available"):
        iconify.load_set("openmoji")


def test_slug_and_concept_names():
    assert iconify.slug("flag: Côte d’Ivoire") == "flag-cote-divoire"  # as Iconify spells it
    assert iconify.slug("Japanese “here” button") == "japanese-here-button"
    assert iconify.concept_name("bell-outline") == "bell"
    assert iconify.concept_name("heart-fill") == "heart"
    assert iconify.concept_name("arrow-left-outline-rounded") == "arrow left"
    assert iconify.concept_name("abstract-094") == "abstract"
    assert iconify.concept_name("food-apple") == "food apple"
    assert iconify.concept_name("a-b") is None and iconify.concept_name("10k") is None


def test_emoji_sets_map_onto_the_catalogue_by_code_points_and_names(full_catalog):
    by_id = {e.id: e for e in full_catalog}
    flat = iconify.load_set("fluent-emoji-flat")  # has chars.json
    names = iconify.emoji_icon_names(flat, full_catalog)
    assert names["1F52B"] == "water-pistol" and names["1F34E"] == "red-apple"
    assert len(names) > 1400
    emojione = iconify.load_set("emojione")  # no chars.json: CLDR name slugs only
    names = iconify.emoji_icon_names(emojione, full_catalog)
    assert len(names) > 900
    for emoji_id, name in names.items():
        assert name == iconify.slug(by_id[emoji_id].name)
        assert name in emojione.icons or name in emojione.aliases


def test_icon_concepts_merge_sets_and_weights():
    concepts = {c.name: c for c in iconify.icon_concepts(("ph", "tabler", "fa6-solid"))}
    bell = concepts["bell"]
    assert {p for p, _ in bell.sources} == {"ph", "tabler", "fa6-solid"}
    assert ("ph", "bell-bold") in bell.sources and ("ph", "bell-fill") in bell.sources
    texts = render.icon_name_captions(bell) + render.icon_keyword_captions(bell)
    assert texts[0] == "an icon of a bell" and len(render.icon_keyword_captions(bell)) <= render.ICON_KEYWORDS_MAX


def test_rasterising_is_deterministic_and_the_glyph_cache_round_trips(cache):
    svg = iconify.load_set("mdi").svg("food-apple")
    a, b = iconify.rasterize(svg), iconify.rasterize(svg)
    assert a.shape == (iconify.GLYPH_SIZE, iconify.GLYPH_SIZE, 4) and np.array_equal(a, b)
    sources = [("mdi", "food-apple"), ("fluent-emoji-flat", "red-apple"), ("lucide", "sword")]
    bank = iconify.glyph_bank(sources)
    files = list((cache / "emoji").glob("iconify-glyphs-*.npz"))
    assert len(files) == 1
    again = iconify.glyph_bank(sources)  # from the .npz
    assert set(bank) == set(again) == set(sources)
    for key in sources:
        assert np.array_equal(bank[key], again[key])
    colour, mono = bank[("fluent-emoji-flat", "red-apple")], bank[("mdi", "food-apple")]
    assert colour[..., :3].std() > 10  # a colour emoji keeps its colours
    assert not mono[..., :3].any() and mono[..., 3].max() == 255  # an icon is stored as black + alpha
    assert np.array_equal(mono, iconify.crop_to_content(iconify.rasterize(svg)))


def test_iconify_styles_render_emoji_and_the_held_out_style_is_never_trained(full_catalog, cache):
    apple = next(e for e in full_catalog if e.id == "1F34E")
    for style in ("fluent-emoji-flat", render.HELD_OUT_STYLE):
        pixels = render.render_image(apple, style, seed=3, index=0)
        assert pixels.shape == (render.IMAGE_SIZE, render.IMAGE_SIZE, 3)
        assert np.array_equal(pixels, render.render_image(apple, style, seed=3, index=0))
    from curation.emoji import train

    assert render.HELD_OUT_STYLE not in train.TrainConfig().emoji_sets
    with pytest.raises(ValueError, match="held-out style"):
        train.prepare_data(train.TrainConfig(emoji_sets=(render.HELD_OUT_STYLE,), icon_sets=()), full_catalog[:20])


def test_train_data_keeps_the_hold_out_and_validation_out_of_training(full_catalog, cache):
    from curation.emoji import train

    cfg = train.TrainConfig(emoji_sets=("fluent-emoji-flat", "emojione"), icon_sets=("fa6-solid",))
    data = train.prepare_data(cfg, full_catalog)
    trained = {e.id for e in data.emojis}
    held, validation = {e.id for e in data.held_out}, {e.id for e in data.validation}
    assert len(held) == 280 and not trained & held and not trained & validation and not held & validation
    # today's hold-out is unchanged by v2's validation split
    assert held == {e.id for e in catalog.holdout_split(full_catalog)[1]}
    assert len(data.glyphs) == len(data.emojis) + len(data.icons) == data.name_idx.shape[0]
    styles = {s for per_concept in data.glyph_styles for s in per_concept}
    assert render.HELD_OUT_STYLE not in styles and {"fluent-emoji-flat", "fa6-solid", "noto"} <= styles
    # icon concepts: a validation share never trained; none named like an untrained emoji
    icon_names, validation_icons = {c.name for c in data.icons}, {c.name for c in data.validation_icons}
    assert validation_icons and not icon_names & validation_icons
    assert len(validation_icons) == len(data.validation_icon_glyphs) and all(data.validation_icon_glyphs)
    untrained = {train.phrase(render.display_name(e)) for e in data.held_out + data.validation}
    assert not any(train.mentions(train.phrase(t), untrained) for c in data.icons + data.validation_icons
                   for t in (c.name, *c.aliases))
    gone = data.validation_icons[0].name
    everything = [c for c in data.icons + data.validation_icons if c.name != gone][::-1]
    smaller = train.split_icon_concepts(everything, 0.02, data.emojis)
    assert {c.name for c in smaller[1]} == validation_icons - {gone}  # stable by name, not by position
    taught = {train.phrase(t) for c in data.icons for t in (c.name, *c.aliases)}
    taught |= {train.phrase(t) for e in data.emojis for t in (render.display_name(e), *e.keywords)}
    assert not any({train.phrase(t) for t in (c.name, *c.aliases)} & taught for c in data.validation_icons)
    batches = train.RenderBatches(data, seed=1, batch_size=64, emoji_fraction=cfg.emoji_fraction)
    _, targets = batches.batch(0)
    emoji_share = targets[:, :len(data.emojis)].sum() / targets.sum()
    assert 0.55 < emoji_share < 0.95  # emoji_fraction 0.75
    again = train.RenderBatches(data, seed=1, batch_size=64, start=5, stride=1).batch(5)
    assert np.array_equal(train.RenderBatches(data, seed=1, batch_size=64).batch(5)[0], again[0])


def _tiny_config(tmp_path, **changes):
    from curation.emoji import train

    base = dict(out=str(tmp_path / "w" / "tiny.safetensors"), steps=4, batch_size=8, workers=0, warmup_steps=2,
                vision_cfg=TINY_VISION, log_every=1, emoji_sets=("fluent-emoji-flat",), icon_sets=("fa6-solid",),
                checkpoint_every=2, eval_per_emoji=1)
    base.update(changes)
    return train.TrainConfig(**base)


@pytest.mark.slow
def test_training_resumes_from_its_checkpoint_step_for_step(full_catalog, tmp_path, cache, monkeypatch):
    import torch

    from curation.emoji import train

    from curation.emoji.model import create_emoji_clip, save_image_tower
    from curation.storage import file_sha256

    subset = [e for e in full_catalog if e.subgroup in ("fruit-food", "face-smiling", "tool")]
    init = tmp_path / "init.safetensors"  # both runs start from the same weights file
    save_image_tower(create_emoji_clip("cpu", TINY_VISION)[0], init, {})
    started_from = file_sha256(init)
    whole = _tiny_config(tmp_path, checkpoint_dir=str(tmp_path / "whole"), init_from=str(init))
    sidecar = train.train(whole, ["test"], emojis=subset)
    assert [h["step"] for h in sidecar["train"]["validation"]] == [2, 4]
    assert sidecar["train"]["chosen"]["step"] in (2, 4)
    assert set(sidecar["eval"]["naming"]) == {"trained", "validation", "held_out"}
    assert render.HELD_OUT_STYLE in sidecar["eval"]["naming"]["trained"]
    assert 0.0 <= sidecar["eval"]["validation_icon_naming_top1"] <= 1.0  # the icon validation chose

    # a run killed right after its step-2 checkpoint, then started again with the same arguments
    split = _tiny_config(tmp_path, checkpoint_dir=str(tmp_path / "split"), out=str(tmp_path / "s" / "t.safetensors"),
                         init_from=str(init))
    original = train.Checkpoints.save

    def save_then_die(self, model, optimizer, step):
        original(self, model, optimizer, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train(split, ["test"], emojis=subset)
    monkeypatch.setattr(train.Checkpoints, "save", original)
    # meanwhile the start file is gone (replaced, say, when a run's output became the committed
    # weights: a resumed run reads it no more), and the checkpoint is made to look like one
    # written before the soft-target fields existed
    init.unlink()
    last = tmp_path / "split" / "last.pt"
    stored = torch.load(last, weights_only=True)
    older = json.loads(stored["config"])
    del older["soft_share"], older["soft_temperature"]
    torch.save({**stored, "config": json.dumps(older)}, last)
    resumed = train.train(split, ["test"], emojis=subset)
    assert [s["from_step"] for s in resumed["train"]["segments"]] == [0, 2]
    assert resumed["train"]["steps_done"] == 4
    assert sidecar["init_from_sha256"] == resumed["init_from_sha256"] == started_from
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for key, tensor in a["trained"].items():
        assert torch.equal(tensor, b["trained"][key]), key
    assert json.loads(a["state"])["losses"] == json.loads(b["state"])["losses"]

    with pytest.raises(ValueError, match=r"\['lr'\]"):
        train.train(_tiny_config(tmp_path, checkpoint_dir=str(tmp_path / "split"), lr=1e-3, init_from=str(init)),
                    ["test"], emojis=subset)
    # a soft-target field the checkpoint predates counts as its default, so another value is
    # refused; so is a checkpoint that predates a field whose default changed behaviour
    stored = torch.load(last, weights_only=True)
    torch.save({**stored, "config": json.dumps(older)}, last)
    with pytest.raises(ValueError, match=r"\['soft_share'\]"):
        train.train(_tiny_config(tmp_path, checkpoint_dir=str(tmp_path / "split"), soft_share=0.3,
                                 init_from=str(init)), ["test"], emojis=subset)
    del older["fold_icons"]
    torch.save({**stored, "config": json.dumps(older)}, last)
    with pytest.raises(ValueError, match=r"\['fold_icons'\]"):
        train.train(split, ["test"], emojis=subset)
    with pytest.raises(ValueError, match="needs --steps"):
        train.train(_tiny_config(tmp_path, steps=None, checkpoint_dir=str(tmp_path / "x")), ["test"], emojis=subset)
