"""engine.report: real shards, real embed (shapes-tiny), real select; pages checked in headless Chromium."""

import base64
import io
import json
import re
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import webdataset as wds
from browser import Browser, find_chromium
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from engine.cache import Cache
from engine.embed import EmbedConfig, embed_shards
from engine.report import ReportConfig, summary_lines, write_report
from engine.report.config import MARKER
from engine.report.rows import class_stats, rank_rejected
from engine.report.thumbnails import THUMB_FORMAT, _shard_thumbnails
from engine.results import Selection
from engine.runtime import EngineError
from engine.select import SelectConfig
from engine.stages import diagnose_from_cache, select_from_cache
from engine.synthetic import ShapesConfig, write_shards

CONFIG = ReportConfig(per_class=5, thumb=64, neighbors=3, heatmap_classes=4, classes_per_page=4, workers=2)
# class names and keys that are HTML: escaped, they render literally; unescaped, they inject elements
ODD_NAMES = ['<i id="inj">red</i> & "o"', "it's <u>orange</u> &amp;", "<script>x=1</script>'\""]
ODD_KEY = "s{shard}<u>&\"'{i:03d}"
LOADED_IMAGES = "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """120 rows of 6 classes (3 shards, 40% noise), embedded and selected; no knn/ group."""
    root = tmp_path_factory.mktemp("report-cache")
    made = write_shards(root / "shards", ShapesConfig(classes=6, per_shard=40, shards=3, noise="mix", rate=0.4, seed=3))
    path = str(root / "feats.zarr")
    embed_shards(
        made["shards"],
        path,
        EmbedConfig(classes=made["classes_file"], true_label_key="true_cls", batch_size=64, workers=0),
        show_progress=False,
    )
    select_from_cache(path, SelectConfig(device="cpu"), show_progress=False)
    return path


@pytest.fixture(scope="module")
def report(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    return write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium binary found (install Debian's `chromium` or set $CHROMIUM)")
    session = Browser(binary, timeout=30)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """60 rows of 3 classes named like HTML, keys like HTML, every image 64x32 (2:1), embedded,
    selected and reported."""
    from engine.synthetic import class_file, shard_samples

    root = tmp_path_factory.mktemp("odd")
    (root / "shards").mkdir()
    doc = class_file(3)
    for entry, name in zip(doc["classes"], ODD_NAMES):
        entry["name"] = name
    (root / "classes.json").write_text(json.dumps(doc))
    config = ShapesConfig(classes=3, per_shard=30, shards=2, noise="mix", rate=0.4, seed=5)
    shards = []
    for shard in range(config.shards):
        shards.append(str(root / "shards" / f"odd-{shard:06d}.tar"))
        with wds.TarWriter(shards[-1]) as sink:
            for i, sample in enumerate(shard_samples(config, shard)):
                wide = io.BytesIO()
                Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((64, 32)).save(wide, format="JPEG")
                sink.write({**sample, "__key__": ODD_KEY.format(shard=shard, i=i), "jpg": wide.getvalue()})
    path = str(root / "feats.zarr")
    embed_shards(
        shards,
        path,
        EmbedConfig(classes=str(root / "classes.json"), true_label_key="true_cls", batch_size=64, workers=0),
        show_progress=False,
    )
    select_from_cache(path, SelectConfig(device="cpu"), show_progress=False)
    return write_report(path, str(root / "report"), CONFIG, device="cpu", show_progress=False)


def _rows(path: str):
    c = Cache(path)
    stored = Selection.read(c)
    arrays = {
        "selected": stored.selected,
        **{f"{name}/loss_score": r.loss_score for name, r in stored.classifiers.items()},
    }
    return c, arrays, stored.attrs


def _class_page(report: dict, c: int) -> str:
    return f"{report['out']}/classes/{c:04d}.html"


def _gallery(page: str) -> list[tuple[int, list[tuple[int, float]]]]:
    """[(row, [(neighbor row, similarity), ...])] of a class page, in page order."""
    html = open(page).read()
    out = []
    for block in re.split(r'<figure class="sample"', html)[1:]:
        row = int(re.match(r' data-row="(\d+)"', block).group(1))
        nbs = [
            (int(r), float(s)) for r, s in re.findall(r'<li class="nb" data-row="(\d+)" data-sim="([-\d.]+)"', block)
        ]
        out.append((row, nbs))
    return out


def _check_png(data: bytes, width: int, height: int) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (width, height)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is (almost) blank"


# ---------------------------------------------------------------- in the browser
def test_index_page_renders_charts_without_errors(report, browser, tmp_path):
    browser.navigate(f"file://{report['index']}")
    assert browser.errors() == []
    counts = browser.evaluate("""({
        bars: document.querySelectorAll('svg.bars rect.bar-rejected').length,
        kept: document.querySelectorAll('svg.bars rect.bar-selected').length,
        cells: document.querySelectorAll('svg.heatmap rect.cell').length,
        rowLabels: Array.from(document.querySelectorAll('svg.heatmap text.row-label'))
                        .filter(t => t.getBBox().width > 0 && t.textContent.trim()).length,
        colLabels: Array.from(document.querySelectorAll('svg.heatmap text.col-label'))
                        .filter(t => t.getBBox().width > 0 && t.textContent.trim()).length,
        barLabels: Array.from(document.querySelectorAll('svg.bars text.lbl'))
                        .filter(t => t.getBBox().width > 0).map(t => t.textContent),
        tableRows: document.querySelectorAll('table.classes tr[data-class]').length,
        next: !!document.querySelector('a[href="index-2.html"]'),
    })""")
    assert counts["bars"] == counts["kept"] == 4 and counts["tableRows"] == 4  # classes_per_page
    assert counts["cells"] == 16 and counts["rowLabels"] == counts["colLabels"] == 4  # heatmap_classes
    names = Cache(report["cache"]).class_names
    assert len([t for t in counts["barLabels"] if t in names]) == 4 and counts["next"]
    shot = browser.screenshot(tmp_path / "index.png", width=1200, height=900)
    _check_png(shot, 1200, 900)
    browser.navigate(f"file://{report['out']}/index-2.html")
    assert browser.errors() == []
    assert browser.evaluate("document.querySelectorAll('svg.bars rect.bar-rejected').length") == 2


def test_class_page_loads_every_thumbnail(report, browser, tmp_path):
    c, arrays, _ = _rows(report["cache"])
    labels = c.labels()
    rejected = np.bincount(labels[~arrays["selected"]], minlength=6)
    worst = int(rejected.argmax())
    shown = min(CONFIG.per_class, int(rejected[worst]))
    browser.navigate(f"file://{_class_page(report, worst)}")
    assert browser.errors() == []
    assert browser.evaluate("document.querySelectorAll('figure.sample').length") == shown
    assert browser.evaluate("document.images.length") == shown * (1 + CONFIG.neighbors)
    assert browser.evaluate(LOADED_IMAGES) == shown * (1 + CONFIG.neighbors)
    assert browser.evaluate("document.querySelectorAll('svg.ph').length") == 0
    _check_png(browser.screenshot(tmp_path / "class.png", width=1200, height=900), 1200, 900)


def test_a_missing_image_file_is_reported_as_a_console_error(report, browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><img src="nowhere.jpg"></body></html>'
    )
    browser.navigate(f"file://{page}")
    assert any("nowhere.jpg" in e or "ERR_FILE_NOT_FOUND" in e for e in browser.errors())


def test_missing_shard_gives_counted_placeholders(cache, browser, tmp_path):
    c = Cache(cache)
    url = c.manifest["shards"][1]["url"]
    shard, _ = c.provenance()
    moved = tmp_path / "moved.tar"
    shutil.move(url, moved)
    try:
        summary = write_report(cache, str(tmp_path / "r"), CONFIG, device="cpu", show_progress=False)
    finally:
        shutil.move(moved, url)
    name = url.rsplit("/", 1)[1]
    assert summary["missing_shards"] == [name]
    shown = set()
    for k in range(6):
        for row, nbs in _gallery(f"{tmp_path}/r/classes/{k:04d}.html"):
            shown.add(row)
            shown.update(r for r, _ in nbs)
    expected = sum(1 for r in shown if shard[r] == 1)
    assert expected > 0 and summary["placeholders"] == expected
    assert summary["placeholder_reasons"] == {"shard missing": expected}
    assert summary["thumbnails"] == len(shown) - expected
    index = open(f"{tmp_path}/r/index.html").read()
    assert re.search(r'data-stat="placeholders"><th>placeholders</th><td class="v">(\d+)<', index).group(1) == str(
        expected
    )
    for k in range(6):
        page = f"{tmp_path}/r/classes/{k:04d}.html"
        if f"shard missing: {name}" not in open(page).read():
            continue
        browser.navigate(f"file://{page}")
        assert browser.errors() == []
        placeholders = browser.evaluate("document.querySelectorAll('svg.ph').length")
        assert placeholders > 0
        assert browser.evaluate(LOADED_IMAGES) == browser.evaluate("document.images.length")
        assert "shard missing" in browser.evaluate("document.querySelector('svg.ph').textContent")
        break
    else:
        pytest.fail("no class page shows the missing shard")


def test_non_square_thumbnails_keep_their_aspect(odd, browser, tmp_path):
    page = next(_class_page(odd, k) for k in range(3) if _gallery(_class_page(odd, k)))
    browser.navigate(f"file://{page}")
    assert browser.errors() == []
    images = browser.evaluate("""Array.from(document.images).map(i => ({
        w: i.naturalWidth, h: i.naturalHeight, fit: getComputedStyle(i).objectFit,
        nb: !!i.closest('li.nb'), box: [i.clientWidth, i.clientHeight]}))""")
    assert images and any(i["nb"] for i in images) and any(not i["nb"] for i in images)
    assert all(i["w"] == 2 * i["h"] > 0 for i in images)  # the thumbnails are 2:1 files
    assert all(i["fit"] == "contain" for i in images)  # drawn 2:1 inside the square box
    # the rendered pixels: the main image's square box shows the 2:1 picture as a band in the
    # middle, the neutral background above and below it (a stretched picture fills the box)
    browser.screenshot(tmp_path / "page.png", width=1200, height=900)
    rect = browser.evaluate(
        "(r => [r.x, r.y, r.width, r.height])(document.querySelector('.main img').getBoundingClientRect())"
    )
    assert rect[2] == rect[3] == CONFIG.thumb
    shot = browser.call(
        "Page.captureScreenshot", {"format": "png", "clip": dict(zip(("x", "y", "width", "height"), rect), scale=1)}
    )
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (CONFIG.thumb, CONFIG.thumb)
    band = CONFIG.thumb // 4  # 16 rows above and below the picture
    background = np.array([0xE9, 0xEB, 0xEF])
    margins = np.concatenate([pixels[: band - 2, 4:-4], pixels[-(band - 2) :, 4:-4]])  # not the rounded corners
    assert np.abs(margins - background).max() <= 4
    assert np.abs(pixels[band + 2 : -(band + 2)] - background).max() > 20


def test_html_in_class_names_and_keys_renders_literally(odd, browser):
    browser.navigate(f"file://{odd['index']}")
    assert browser.errors() == []
    injected = "document.querySelectorAll('i, u, script, #inj').length"
    assert browser.evaluate(injected) == 0
    index = browser.evaluate("""({
        table: Array.from(document.querySelectorAll('table.classes a')).map(a => a.textContent),
        bars: Array.from(document.querySelectorAll('svg.bars text.lbl')).map(t => t.textContent),
        heat: Array.from(document.querySelectorAll('svg.heatmap text.row-label')).map(t => t.textContent),
        pairs: Array.from(document.querySelectorAll('table.pairs a')).map(a => a.textContent),
    })""")
    assert sorted(index["table"]) == sorted(ODD_NAMES)
    assert set(ODD_NAMES) <= set(index["bars"]) and sorted(index["heat"]) == sorted(ODD_NAMES)
    assert index["pairs"] and set(index["pairs"]) <= set(ODD_NAMES)
    keys = Cache(odd["cache"]).keys()
    checked = 0
    for k, name in enumerate(ODD_NAMES):
        browser.navigate(f"file://{_class_page(odd, k)}")
        assert browser.errors() == [] and browser.evaluate(injected) == 0
        assert browser.evaluate("document.title") == f"{name} - engine report"
        assert browser.evaluate("document.querySelector('h1').textContent") == f"class {k}: {name}"
        cards = browser.evaluate("""Array.from(document.querySelectorAll('figure.sample')).map(f => ({
            row: +f.dataset.row, key: f.dataset.key, text: f.querySelector('.key').textContent,
            title: f.querySelector('.key').title, alt: f.querySelector('.main img').alt,
            given: f.querySelector('figcaption b').textContent,
            nbs: Array.from(f.querySelectorAll('li.nb')).map(li => [+li.dataset.row, li.querySelector('img').alt,
                                                                    li.querySelector('span').textContent])}))""")
        for card in cards:
            key = keys[card["row"]]
            assert "<u>&\"'" in key and card["key"] == card["text"] == card["title"] == card["alt"] == key
            assert card["given"] == name
            for row, alt, label in card["nbs"]:
                assert alt == keys[row] and label in ODD_NAMES
            checked += 1
    assert checked == odd["shown"] > 0


# ---------------------------------------------------------------- content against the cache
def test_summary_numbers_equal_the_selection_group(report):
    c, arrays, attrs = _rows(report["cache"])
    index = open(report["index"]).read()
    stat = lambda key: re.search(
        rf'data-stat="{re.escape(key)}"><th>[^<]*</th><td class="v">([^<]*)<',  # noqa: E731
        index,
    ).group(1)
    for key, value in attrs["counts"].items():
        assert int(stat(f"counts.{key}")) == value
    for key in ("precision", "recall", "f1"):
        assert stat(f"metrics.{key}") == f"{attrs['metrics'][key]:.3f}"
    for name, acc in attrs["metrics"]["accuracy"].items():
        assert stat(f"metrics.accuracy.{name}") == f"{acc:.3f}"
    assert int(stat("rows")) == c.num_rows == report["rows"]
    assert report["selected"] == attrs["counts"]["final"] == int(arrays["selected"].sum())
    assert json.load(open(f"{report['out']}/report.json"))["selected"] == report["selected"]
    labels, true = c.labels(), c.true_labels()
    for page in ("index.html", "index-2.html"):
        for k, cells in re.findall(r'<tr data-class="(\d+)">(.*?)</tr>', open(f"{report['out']}/{page}").read()):
            k = int(k)
            col = dict(re.findall(r'data-col="(\w+)">([^<]*)<', cells))
            mine = labels == k
            assert int(col["labelled"]) == mine.sum() and int(col["selected"]) == (mine & arrays["selected"]).sum()
            assert int(col["wrong"]) == (mine & (true != k)).sum()


def test_galleries_hold_only_rejected_rows_of_their_class_most_suspicious_first(report):
    c, arrays, _ = _rows(report["cache"])
    labels, selected = c.labels(), arrays["selected"]
    suspicion = (arrays["zeroshot/loss_score"] + arrays["linear/loss_score"]) / 2
    total = 0
    for k in range(6):
        rows = [row for row, _ in _gallery(_class_page(report, k))]
        candidates = np.flatnonzero((labels == k) & ~selected)
        expected = candidates[np.argsort(suspicion[candidates], kind="stable")][: CONFIG.per_class]
        assert rows == expected.tolist()
        total += len(rows)
    assert total == report["shown"] > 0


def test_neighbors_equal_brute_force_knn(report):
    features = Cache(report["cache"]).load_features().astype(np.float32)
    checked = 0
    for k in range(6):
        for row, nbs in _gallery(_class_page(report, k))[:2]:
            sims = features @ features[row]
            sims[row] = -np.inf
            top = np.argsort(-sims, kind="stable")[: CONFIG.neighbors]
            assert [r for r, _ in nbs] == top.tolist()
            assert np.allclose([s for _, s in nbs], sims[top], atol=1e-3)
            checked += 1
    assert checked >= 6 and report["neighbors"]["source"] == "flat index"


def test_fresh_knn_group_is_used_and_a_stale_one_ignored(cache, report, tmp_path):
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(cache, copy)
    diagnose_from_cache(copy, k=10, top=3, device="cpu")
    fresh = write_report(copy, str(tmp_path / "a"), CONFIG, device="cpu", show_progress=False)
    assert fresh["neighbors"]["source"] == "knn group (k=10)"
    for k in range(6):
        ours = _gallery(f"{tmp_path}/a/classes/{k:04d}.html")
        theirs = _gallery(_class_page(report, k))
        assert [[r for r, _ in n] for _, n in ours] == [[r for r, _ in n] for _, n in theirs]
    Cache(copy, mode="a").open_group("knn").attrs.update({"fingerprint": "stale"})
    stale = write_report(copy, str(tmp_path / "b"), CONFIG, device="cpu", show_progress=False)
    assert stale["neighbors"]["source"] == "flat index"


def test_thumbnail_problems_become_reasons(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 30, 30)).save(good, format="JPEG")
    shard = str(tmp_path / "s.tar")
    with wds.TarWriter(shard) as sink:
        sink.write({"__key__": "a", "jpg": good.getvalue()})
        sink.write({"__key__": "b", "jpg": b"not a jpeg"})
        sink.write({"__key__": "other", "jpg": good.getvalue()})
    keys = np.array(["a", "b", "c", "d"], dtype=object)
    ticks = []
    got = _shard_thumbnails(shard, np.arange(4), np.arange(4), keys, tmp_path, "00000", 32, ticks.append)
    assert got[0] == (0, "thumbs/00000/000000.jpg", None)
    assert Image.open(tmp_path / got[0][1]).size == (32, 16)
    assert got[1][1] is None and got[1][2][0] == "cannot decode" and got[1][2][1].startswith("b (s.tar): ")
    assert got[2][2] == ("key mismatch", "s.tar: found other, expected c")
    assert got[3][2] == ("sample missing from shard", "s.tar")
    assert sum(ticks) == 4
    gone = _shard_thumbnails(
        str(tmp_path / "gone.tar"), np.arange(2), np.arange(2), keys, tmp_path, "00001", 32, ticks.append
    )
    assert [p for _, _, p in gone] == [("shard missing", "gone.tar")] * 2


def test_a_current_knn_group_is_checked_without_loading_every_feature(cache, report, tmp_path, monkeypatch):
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(cache, copy)
    diagnose_from_cache(copy, k=10, top=3, device="cpu")

    def refuse(self):
        raise AssertionError("load_features: the full N x D load is not needed with a current knn group")

    monkeypatch.setattr(Cache, "load_features", refuse)
    s = write_report(copy, str(tmp_path / "a"), CONFIG, device="cpu", show_progress=False)
    assert s["neighbors"]["source"] == "knn group (k=10)"
    for k in range(6):
        ours = _gallery(f"{tmp_path}/a/classes/{k:04d}.html")
        assert [[r for r, _ in n] for _, n in ours] == [[r for r, _ in n] for _, n in _gallery(_class_page(report, k))]
    Cache(copy, mode="a").open_group("knn").attrs.update({"fingerprint": "stale"})  # a stale one does load them
    with pytest.raises(AssertionError, match="load_features"):
        write_report(copy, str(tmp_path / "b"), CONFIG, device="cpu", show_progress=False)


def test_placeholders_are_grouped_by_kind_not_per_key(cache, report, tmp_path, monkeypatch):
    from engine import reader

    keys = Cache(cache).keys()
    broken = {str(keys[row]) for row, _ in _gallery(_class_page(report, 0))[:2]}
    assert len(broken) == 2
    decode = reader.decode_image

    def failing(sample):
        if sample["__key__"] in broken:
            raise ValueError("cannot decode jpg: truncated")
        return decode(sample)

    monkeypatch.setattr(reader, "decode_image", failing)
    s = write_report(cache, str(tmp_path / "r"), CONFIG, device="cpu", show_progress=False)
    assert s["placeholders"] == 2 and s["placeholder_reasons"] == {"cannot decode": 2}
    assert json.load(open(tmp_path / "r" / "report.json"))["placeholder_reasons"] == {"cannot decode": 2}
    index = open(tmp_path / "r" / "index.html").read()
    assert re.search(r'data-stat="placeholders">.*?<td class="l muted">([^<]*)<', index).group(1) == "cannot decode: 2"
    page = open(_class_page({"out": str(tmp_path / "r")}, 0)).read()
    for key in broken:  # the detail names the key and the error
        assert f'data-reason="cannot decode: {key} (' in page and "truncated" in page


# ---------------------------------------------------------------- vectorised helpers vs loops
def test_rank_rejected_and_class_stats_match_loops():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 5, 300)
    selected = rng.random(300) < 0.5
    suspicion = rng.random(300).round(1)  # ties broken by row
    got = rank_rejected(labels, selected, suspicion, per_class=7)
    expected = []
    for k in range(5):
        rows = [r for r in range(300) if labels[r] == k and not selected[r]]
        expected += sorted(rows, key=lambda r: (suspicion[r], r))[:7]
    assert got.tolist() == expected
    true = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 5, 300))
    stats = class_stats(labels, selected, 5, true)
    for k in range(5):
        mine = labels == k
        assert stats["rejected"][k] == (mine & ~selected).sum()
        assert stats["wrong_selected"][k] == (mine & selected & (true != k)).sum()


# ---------------------------------------------------------------- command line, folders, demo
def test_cli_json_and_one_line_errors(cache, tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        cli,
        [
            "report",
            "--cache",
            cache,
            "--out",
            str(tmp_path / "r"),
            "--per-class",
            "2",
            "-k",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["index"] == str(tmp_path / "r" / "index.html") and summary["class_pages"] == 6
    assert (tmp_path / "r" / MARKER).is_file()
    r = runner.invoke(cli, ["report", "--cache", cache, "--out", str(tmp_path / "r"), "--per-class", "2"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("report: ")  # a rerun replaces it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = runner.invoke(cli, ["report", "--cache", cache, "--out", str(tmp_path / "mine")])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "not an engine report folder" in r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    r = runner.invoke(cli, ["report", "--cache", cache, "--out", str(tmp_path / "x"), "--thumb", "5"])
    assert r.exit_code == 2 and "thumb" in r.stderr


def test_a_run_killed_mid_swap_or_mid_build_is_undone_by_the_next(cache, tmp_path, caplog):
    """SIGKILL between the swap's renames leaves no OUT, the earlier report under a hidden name
    and the new one (holding the user's file) under another; a killed build leaves a hidden
    folder. The next run puts the earlier report and the user's file back, removes the debris,
    and leaves alone the folder of a report still running (it holds its lock)."""
    import os
    import shutil

    from engine.files import lock_folder

    out = tmp_path / "r"
    write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)
    (out / "notes.txt").write_text("mine")
    old = tmp_path / ".r.engine-report-old-otherhost-4242-aaaaaaaaaaaa"
    new = tmp_path / ".r.engine-report-new-otherhost-4242-bbbbbbbbbbbb"
    os.rename(out, old)  # the swap's first rename...
    shutil.copytree(old, new)  # ...a finished new report beside it,
    (old / "notes.txt").unlink()  # and the user's file already moved into it
    live = tmp_path / ".r.engine-report-new-otherhost-4243-cccccccccccc"
    live.mkdir()
    holder = lock_folder(live, wait=False)  # a report still running, on any host
    try:
        write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)
        assert (out / "notes.txt").read_text() == "mine" and (out / "index.html").is_file()
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".r."))
        assert left == [live.name]
        assert "restored the earlier report" in caplog.text and "moved notes.txt back" in caplog.text
    finally:
        os.close(holder)


def test_recovery_never_deletes_a_file_of_the_users(cache, tmp_path):
    """A killed run's folder holding a file whose name `out` already has: the file comes back
    under another name; one that cannot come back keeps its folder."""
    out = tmp_path / "r"
    write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)
    (out / "notes.txt").write_text("new notes")
    debris = tmp_path / ".r.engine-report-new-h-1-dddddddddddd"
    debris.mkdir()
    (debris / "notes.txt").write_text("old notes")
    write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)
    assert (out / "notes.txt").read_text() == "new notes"
    assert (out / "notes.txt.recovered-1").read_text() == "old notes" and not debris.exists()
    stray = tmp_path / "elsewhere"  # OUT is gone and nothing to restore: the folder is kept
    stray_debris = tmp_path / ".elsewhere.engine-report-new-h-1-eeeeeeeeeeee"
    stray_debris.mkdir()
    (stray_debris / "mine.txt").write_text("x")
    from engine.report import report_folder

    assert any("kept" in line for line in report_folder(stray).recover()) and (stray_debris / "mine.txt").exists()


def test_a_rerun_reuses_thumbnails_and_rereads_only_a_changed_shard(cache, tmp_path, monkeypatch):
    from engine import reader
    from engine.reader import read_samples

    out = tmp_path / "r"
    first = write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)
    thumbs = lambda: {str(p.relative_to(out)): p.read_bytes() for p in (out / "thumbs").rglob("*.jpg")}  # noqa: E731
    before = thumbs()
    assert first["thumbnails_reused"] == 0 and len(before) == first["thumbnails"] > 0
    opened = []
    real = reader.read_samples
    monkeypatch.setattr(reader, "read_samples", lambda url, positions: opened.append(url) or real(url, positions))
    again = write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)
    assert opened == [] and again["thumbnails_reused"] == again["thumbnails"] == first["thumbnails"]
    assert thumbs() == before and "from the previous report" in "\n".join(summary_lines(again))

    urls = [s["url"] for s in Cache(cache).manifest["shards"]]
    victim = urls[1]
    original = open(victim, "rb").read()
    samples = [sample for _, sample in read_samples(victim)]
    try:  # the same keys, other images: its thumbnails must be made anew, the others reused
        with wds.TarWriter(victim, encoder=False) as sink:
            for sample in samples:
                buf = io.BytesIO()
                Image.new("RGB", (64, 64), (255, 0, 255)).save(buf, format="JPEG")
                sink.write({**sample, "jpg": buf.getvalue()})
        third = write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)
    finally:
        open(victim, "wb").write(original)
    assert opened == [victim]
    changed = {k for k, v in thumbs().items() if before.get(k) != v}
    assert changed and all(k.startswith("thumbs/00001/") for k in changed)
    assert third["thumbnails_reused"] == third["thumbnails"] - len(changed)
    for broken in (
        f'{{"size": 64, "format": "{THUMB_FORMAT}", "shards": []}}',
        f'{{"size": 64, "format": "{THUMB_FORMAT}", "shards": {{"00000": {{"keys": 3}}}}}}',
        "{",
    ):
        (out / "thumbs" / "index.json").write_text(broken)  # misshapen: ignored, nothing reused
        assert write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)["thumbnails_reused"] == 0


def test_a_failed_rerun_leaves_the_earlier_report(cache, tmp_path, monkeypatch):
    import torch

    from engine import reader

    out = tmp_path / "r"
    write_report(cache, str(out), CONFIG, device="cpu", show_progress=False)
    (out / "notes.txt").write_text("mine")
    snapshot = lambda: {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
    before = snapshot()
    assert "index.html" in before and any(name.startswith("thumbs/") for name in before)
    if not torch.cuda.is_available():
        r = CliRunner().invoke(cli, ["report", "--cache", cache, "--out", str(out), "--device", "cuda"])
        assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "device" in r.stderr
        assert snapshot() == before
    calls = []

    def crash(sample):  # after a few thumbnails are written: not a decode problem, a crash
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return decode(sample)

    decode = reader.decode_image
    monkeypatch.setattr(reader, "decode_image", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):  # another size: thumbnails are made anew
        write_report(
            cache, str(out), ReportConfig(**{**asdict(CONFIG), "thumb": 48}), device="cpu", show_progress=False
        )
    assert snapshot() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no staging folder left behind
    monkeypatch.setattr(reader, "decode_image", decode)
    s = write_report(cache, str(out), ReportConfig(per_class=2, neighbors=1), device="cpu", show_progress=False)
    after = snapshot()
    assert after["notes.txt"] == b"mine" and after["index.html"] != before["index.html"]
    assert json.loads(after["report.json"])["config"]["per_class"] == 2 and s["index"] == str(out / "index.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_missing_selection_names_engine_select(tmp_path):
    from engine.importer import import_npz

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((20, 8)).astype(np.float32)
    np.savez(
        tmp_path / "f.npz", features=feats / np.linalg.norm(feats, axis=1, keepdims=True), labels=rng.integers(0, 2, 20)
    )
    import_npz(str(tmp_path / "f.npz"), str(tmp_path / "c.zarr"))
    r = CliRunner().invoke(cli, ["report", "--cache", str(tmp_path / "c.zarr"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "engine select" in r.stderr
    assert not (tmp_path / "r").exists()
    with pytest.raises(EngineError, match="per-class"):
        ReportConfig(per_class=0)


def test_imported_cache_without_text_or_images(tmp_path):
    """No prompts: the heatmap uses image centroids; no shards: every image is a counted placeholder."""
    from engine.importer import import_npz

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    feats = rng.standard_normal((3, 16))[labels] + 0.3 * rng.standard_normal((60, 16))
    np.savez(tmp_path / "f.npz", features=feats / np.linalg.norm(feats, axis=1, keepdims=True), labels=labels)
    import_npz(str(tmp_path / "f.npz"), str(tmp_path / "c.zarr"))
    selected = rng.random(60) < 0.7
    Selection(selected=selected, filled=np.zeros(60, bool), noise_score=np.zeros(60, np.float32)).write(
        Cache(str(tmp_path / "c.zarr"), mode="a")
    )
    s = write_report(str(tmp_path / "c.zarr"), str(tmp_path / "r"), CONFIG, device="cpu", show_progress=False)
    assert s["heatmap"] == {"classes": 3, "source": "image: class centroids of the features"}
    shown = set()
    for k in range(3):
        for row, nbs in _gallery(f"{tmp_path}/r/classes/{k:04d}.html"):
            shown.update([row, *[r for r, _ in nbs]])
    assert s["thumbnails"] == 0 and s["placeholders"] == len(shown) > 0
    assert s["placeholder_reasons"] == {"no image": len(shown)}
    assert s["shown"] == sum(min(CONFIG.per_class, int(((labels == k) & ~selected).sum())) for k in range(3))
    assert 'data-reason="no image: imported features' in open(f"{tmp_path}/r/classes/0000.html").read()


def test_demo_ends_with_the_report(tmp_path):
    from engine.demo import DemoConfig, run_demo
    from engine.demo import summary_lines as demo_lines

    summary = run_demo(
        tmp_path / "demo",
        DemoConfig(classes=6, train_shards=2, per_shard=60, test_images=60, epochs=2),
        show_progress=False,
    )
    index = tmp_path / "demo" / "report" / "index.html"
    assert index.is_file() and summary["report"]["index"] == str(index)
    assert summary["report"]["class_pages"] == 6 and summary["report"]["placeholders"] == 0
    assert list(demo_lines(summary))[-1].startswith(f"report: {index}")
    assert list(summary_lines(summary["report"]))[0].startswith(f"report: {index}")
