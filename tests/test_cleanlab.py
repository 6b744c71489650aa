"""cleanlab itself on the engine's exports, without conversion: `select --export-probs` for
`find_label_issues(pred_probs=...)` and `diagnose --export-knn` for `Datalab(...).find_issues(
knn_graph=...)`, on a real embedded shapes cache; the issues cleanlab finds are the samples the
engine rejects."""

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from engine.cache import Cache
from engine.results import Selection

cleanlab = pytest.importorskip("cleanlab")


def _cli(args) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """200 shapes images of 10 classes with 30% symmetric noise, embedded with shapes-tiny,
    selected (probabilities exported) and diagnosed (kNN graph exported)."""
    root = tmp_path_factory.mktemp("cleanlab")
    shards, cache, probs, knn = root / "shards", str(root / "c.zarr"), root / "probs", root / "knn.npz"
    _cli(
        ["make-shards", "--out", str(shards), "--num-classes", "10", "--per-shard", "100", "--shards", "2"]
        + ["--noise", "sym", "--rate", "0.3"]
    )
    _cli(
        ["embed", str(shards / "*.tar"), "--cache", cache, "--classes", str(shards / "classes.json")]
        + ["--true-label-key", "true_cls", "--workers", "0", "--batch-size", "100"]
    )
    _cli(["select", "--cache", cache, "--device", "cpu", "--export-probs", str(probs)])
    _cli(["diagnose", "--cache", cache, "--device", "cpu", "-k", "10", "--export-knn", str(knn)])
    opened = Cache(cache)
    return {
        "labels": opened.labels(),
        "true": opened.true_labels(),
        "features": opened.load_features(),
        "rejected": ~Selection.read(opened).selected,
        "probs": probs,
        "knn": knn,
    }


def _overlap(issues: np.ndarray, rejected: np.ndarray) -> float:
    return float((issues & rejected).sum() / issues.sum())


def test_find_label_issues_takes_the_exported_probabilities(exported):
    from cleanlab.filter import find_label_issues

    labels, rejected, noisy = exported["labels"], exported["rejected"], exported["labels"] != exported["true"]
    for name in ("linear", "zeroshot"):
        pred_probs = np.load(exported["probs"] / f"probs_{name}.npy")
        issues = find_label_issues(labels, pred_probs=pred_probs)
        assert issues.shape == labels.shape and issues.dtype == bool
        assert issues.sum() >= 0.5 * noisy.sum(), name  # it finds a good part of the noise
        assert _overlap(issues, rejected) >= 0.8, name  # and the engine rejects most of what it finds
        assert _overlap(issues, noisy) >= 0.7, name


@pytest.mark.filterwarnings("ignore:Both `features` and `knn_graph` were provided")  # as asked: both
def test_datalab_takes_the_exported_knn_graph(exported):
    import scipy.sparse

    knn_graph = scipy.sparse.load_npz(exported["knn"])
    labels, rejected, noisy = exported["labels"], exported["rejected"], exported["labels"] != exported["true"]
    assert knn_graph.shape == (len(labels), len(labels))
    lab = cleanlab.Datalab(data={"label": labels}, label_name="label", verbosity=0)
    lab.find_issues(features=exported["features"], knn_graph=knn_graph)
    found = lab.get_issues("label")["is_label_issue"].to_numpy()
    assert found.sum() >= 0.5 * noisy.sum() and _overlap(found, rejected) >= 0.8 and _overlap(found, noisy) >= 0.6
    for issue in ("outlier", "near_duplicate"):  # the issue types that read the kNN graph ran on it
        assert issue in set(lab.get_issue_summary()["issue_type"])
