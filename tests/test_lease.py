"""The S3 lease (`engine.lease`) against a real S3 API (moto's server on loopback), and two
independent `engine embed` jobs sharing one S3 cache at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from engine.append import CacheWriter
from engine.cache import Cache
from engine.embed import EmbedConfig, embed_shards
from engine.lease import LOCK_NAME, S3Lease
from engine.runtime import EngineError
from engine.synthetic import ShapesConfig, write_shards


def _url() -> str:
    return f"s3://engine-test/lease-{uuid.uuid4().hex[:8]}/feats.zarr"


def _lock_exists(url: str) -> bool:
    import fsspec

    return fsspec.filesystem("s3").exists(f"{url[5:]}/{LOCK_NAME}")


def test_a_held_lease_excludes_others_until_released(s3):
    url = _url()
    first = S3Lease(url, ttl=30)
    first.acquire()
    assert _lock_exists(url)
    with pytest.raises(EngineError, match=rf"locked by pid {os.getpid()}"):
        S3Lease(url, ttl=30, timeout=1.0).acquire()
    first.release()
    assert not _lock_exists(url)
    with S3Lease(url, ttl=30, timeout=1.0):
        assert _lock_exists(url)
    assert not _lock_exists(url)


def test_only_one_of_many_contenders_holds_the_lease_at_a_time(s3):
    url, inside, overlaps, order = _url(), [0], [], []
    guard = threading.Lock()

    def work(i):
        for _ in range(3):
            with S3Lease(url, ttl=30, poll=0.01):
                with guard:
                    inside[0] += 1
                    overlaps.append(inside[0])
                time.sleep(0.02)
                with guard:
                    inside[0] -= 1
                order.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(order) == 12 and max(overlaps) == 1


def test_a_live_holder_renews_and_is_never_taken_over(s3):
    url = _url()
    with S3Lease(url, ttl=3.0) as holder:
        first = holder.etag
        with pytest.raises(EngineError, match="locked by"):
            S3Lease(url, ttl=3.0, timeout=7.0).acquire()  # waits well past the ttl
        assert holder.etag != first and holder.lost is None  # the heartbeat rewrote it


def test_a_dead_holders_lease_is_taken_over_after_the_ttl(s3, caplog):
    import fsspec

    url = _url()
    # a holder that was SIGKILLed: its lock object stays and is never renewed
    fsspec.filesystem("s3").pipe_file(f"{url[5:]}/{LOCK_NAME}", json.dumps({"host": "gone", "pid": 4242}).encode())
    start = time.monotonic()
    with S3Lease(url, ttl=1.0, timeout=30) as lease:
        assert lease.etag
    waited = time.monotonic() - start
    assert 1.0 <= waited < 10
    assert "took over a lock not renewed" in caplog.text and "pid 4242 on gone" in caplog.text


def test_a_holder_that_was_taken_over_writes_nothing_more_and_says_so(s3, tmp_path):
    import fsspec

    url = _url()
    lease = S3Lease(url, ttl=30)
    lease.acquire()
    lease._stop.set()  # as if the process had stalled: no renewal
    fsspec.filesystem("s3").pipe_file(f"{url[5:]}/{LOCK_NAME}", b'{"pid": 1, "host": "other"}')  # taken over
    with pytest.raises(EngineError, match="lost the lock"):
        lease.release()
    assert _lock_exists(url)  # the new holder's lock is left alone


def test_every_manifest_change_on_s3_holds_the_lease(s3, shard_paths, monkeypatch):
    """Creation, schema, register, consolidate, trim and prompts each take and release the lock."""
    taken, callers = [], []
    real_acquire, real_lock = S3Lease.acquire, CacheWriter._locked

    def counting(self):
        taken.append(self.url)
        return real_acquire(self)

    def lock(self):
        callers.append(sys._getframe(1).f_code.co_name)
        return real_lock(self)

    monkeypatch.setattr(S3Lease, "acquire", counting)
    monkeypatch.setattr(CacheWriter, "_locked", lock)
    url = _url()
    embed_shards(shard_paths[:1], url, EmbedConfig(workers=0, classes="shapes"), rank=0, world_size=1)
    assert {"initialise", "register_shards", "consolidate", "trim", "write_text"} <= set(callers)
    assert len(taken) == len(callers) + 1 and set(taken) == {url}  # + 1: creating the cache
    assert not _lock_exists(url) and Cache(url).num_rows == 40


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("lease-shards")
    return write_shards(out, ShapesConfig(classes=10, per_shard=12, shards=8, noise="mix", rate=0.3, seed=5))


def _job(shards: list, url: str, s3: dict, classes: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "embed",
        *shards,
        "--cache",
        url,
        "--classes",
        classes,
        "--true-label-key",
        "true_cls",
        "--workers",
        "0",
        "--json",
    ]
    env = {**os.environ, **s3, "ENGINE_THREADS": "1", "ENGINE_CONSOLIDATE_EVERY_S": "0"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_jobs_embed_into_one_s3_cache_at_once(many_shards, s3, tmp_path):
    """Two independent jobs with overlapping shard lists, started together, each appending
    after every shard: the cache ends with every shard once, equal to a 1-job local run."""
    shards, classes = many_shards["shards"], many_shards["classes_file"]
    url = _url()
    jobs = [_job(shards[:6], url, s3, classes), _job(shards[2:], url, s3, classes)]
    try:
        outs = [j.communicate(timeout=300) for j in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    for job, (_out, err) in zip(jobs, outs):
        assert job.returncode == 0, err[-2000:]
    reference = str(tmp_path / "ref.zarr")
    embed_shards(
        shards, reference, EmbedConfig(classes=classes, true_label_key="true_cls", workers=0), rank=0, world_size=1
    )
    got, ref = Cache(url), Cache(reference)
    keys, ref_keys = np.asarray(got.keys(), dtype=object), np.asarray(ref.keys(), dtype=object)
    assert got.num_rows == ref.num_rows == len(set(keys))
    order, ref_order = np.argsort(keys), np.argsort(ref_keys)
    assert (keys[order] == ref_keys[ref_order]).all()
    # the jobs run with one torch thread, the reference with the test's: bf16 rounding may differ by an ulp
    np.testing.assert_allclose(
        got.load_features()[order].astype(np.float32), ref.load_features()[ref_order].astype(np.float32), atol=2e-3
    )
    np.testing.assert_array_equal(got.labels()[order], ref.labels()[ref_order])
    urls = [s["url"] for s in got.manifest["shards"]]
    shard, position = got.provenance()
    source = np.asarray([f"{urls[s]}#{p}" for s, p in zip(shard, position)], dtype=object)
    ref_urls = [s["url"] for s in ref.manifest["shards"]]
    ref_shard, ref_position = ref.provenance()
    ref_source = np.asarray([f"{ref_urls[s]}#{p}" for s, p in zip(ref_shard, ref_position)], dtype=object)
    assert (source[order] == ref_source[ref_order]).all()
    assert sorted(s["status"] for s in got.manifest["shards"]) == ["done"] * len(shards)
    assert not _lock_exists(url)
    new_rows = sum(json.loads(out)["new_rows"] for out, _ in outs)
    assert new_rows >= ref.num_rows  # overlapping shards may be embedded twice, but appended once


def test_a_retried_take_that_had_landed_is_recognised_as_ours(s3):
    """The response to our If-None-Match PUT was lost and the retry got 412: the lock object
    carries our nonce, so we hold it at once instead of waiting a ttl to take over ourselves."""
    import fsspec

    url = _url()
    lease = S3Lease(url, ttl=30, timeout=2.0)
    fsspec.filesystem("s3").pipe_file(
        f"{url[5:]}/{LOCK_NAME}", json.dumps({"host": "here", "pid": os.getpid(), "nonce": lease.nonce}).encode()
    )
    start = time.monotonic()
    lease.acquire()
    assert time.monotonic() - start < 2.0 and lease.etag
    lease.release()
    assert not _lock_exists(url)


def test_a_holder_that_cannot_renew_fences_itself_before_anyone_may_take_over(s3):
    url = _url()
    lease = S3Lease(url, ttl=4.0)
    lease.acquire()
    lease.check()  # fresh: fine
    lease._stop.set()  # renewals stop (a stalled process, a partitioned network)
    waiting_since = time.monotonic()
    time.sleep(2.2)  # more than ttl/2 since the last write, less than the ttl a waiter needs
    with pytest.raises(EngineError, match="lost the lock .*not renewed"):
        lease.check()
    if time.monotonic() - waiting_since < 3.5:  # (a stalled test machine proves nothing here)
        with pytest.raises(EngineError, match="locked by"):  # nobody could have taken it over yet
            S3Lease(url, ttl=4.0, timeout=0.3).acquire()
    with pytest.raises(EngineError, match="lost the lock"):
        lease.release()  # and it leaves the object alone: it may be another's by now
    assert _lock_exists(url)


@pytest.mark.parametrize(
    "dropped, named",
    [(("IfNoneMatch", "IfMatch"), "If-None-Match on PUT"), (("IfMatch",), "If-Match on PUT, If-Match on DELETE")],
)
def test_a_store_that_ignores_conditional_writes_is_refused(s3, monkeypatch, dropped, named):
    import fsspec

    import engine.lease as lease_module

    monkeypatch.setattr(lease_module, "_verified_buckets", set())
    url = _url()
    lease = S3Lease(url, ttl=30, timeout=2.0)
    real = lease.fs.call_s3

    def unconditional(method, **kwargs):  # what a store without precondition support does
        for name in dropped:
            kwargs.pop(name, None)
        return real(method, **kwargs)

    monkeypatch.setattr(lease.fs, "call_s3", unconditional)
    with pytest.raises(EngineError, match=f"ignores conditional writes \\({named}.*ENGINE_S3_LOCK=off"):
        lease.acquire()
    assert fsspec.filesystem("s3").find(url[5:].rsplit("/", 1)[0]) == []  # no lock, no probe left


def test_a_botocore_without_conditional_writes_is_refused(monkeypatch):
    """s3fs silently drops parameters its botocore does not know: refuse, do not pretend."""
    import botocore.session

    real = botocore.session.Session.get_service_model

    def old_model(self, name, *args, **kwargs):
        model = real(self, name, *args, **kwargs)
        put = model.operation_model("PutObject").input_shape.members
        monkeypatch.setattr(
            type(model.operation_model("PutObject").input_shape),
            "members",
            property(lambda shape: {k: v for k, v in put.items() if k not in ("IfNoneMatch", "IfMatch")}),
        )
        return model

    from engine.lease import _check_client_supports_conditions as check

    monkeypatch.setattr(botocore.session.Session, "get_service_model", old_model)
    check.cache_clear()  # checked once per process: forget the earlier tests' answer
    try:
        with pytest.raises(EngineError, match="cannot send conditional writes"):
            S3Lease("s3://engine-test/x/feats.zarr")
    finally:
        check.cache_clear()


def test_a_waiter_honours_the_holders_longer_ttl(s3):
    """A holder started with ENGINE_LOCK_TTL_S=600 renews every 150 s: a waiter with a 1 s ttl
    must not take it over after 1 s."""
    import fsspec

    url = _url()
    fsspec.filesystem("s3").pipe_file(
        f"{url[5:]}/{LOCK_NAME}", json.dumps({"host": "slow", "pid": 7, "ttl_s": 600}).encode()
    )
    with pytest.raises(EngineError, match="locked by pid 7 on slow"):
        S3Lease(url, ttl=1.0, timeout=3.0).acquire()
