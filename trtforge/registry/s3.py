"""The S3 store: any S3-compatible endpoint (AWS S3, MinIO, SeaweedFS) through boto3.

The endpoint, region and credentials come only from the standard AWS settings
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, the environment, ``~/.aws``); none of them is ever
put in a message. Conditional writes use ``If-None-Match: *`` and ``If-Match``; since some
S3-compatible servers accept those headers and ignore them, the first write through a store
probes that the server really enforces them. Retries are adaptive unless ``AWS_RETRY_MODE``
says otherwise. Files are read once: their SHA-256 is computed from the very bytes sent, large
files go as parallel multipart uploads whose every part carries its own CRC32 for the server to
check, and the upload is verified by the checksum the server then reports; downloads are hashed
as they are written.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from trtforge.errors import IntegrityError, NotFoundError, RegistryError
from trtforge.registry import crashpoints
from trtforge.registry.storage import (
    HashingWriter,
    ObjectInfo,
    PendingUpload,
    PreconditionFailed,
    RegistryUnreachable,
    StoredObject,
    TransferredFile,
    TransferSettings,
    Writable,
    check_key,
)

DEFAULT_ATTEMPTS = 6
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "403"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_PROBE_PREFIX = "_capability-probe"
_CHECKSUM_MODE = {"ChecksumMode": "ENABLED"}
# What S3 (and SeaweedFS) answer when a body's bytes do not hash to the checksum or signed payload hash sent with them.
_CHECKSUM_MISMATCH_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"})


def parse_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise RegistryError(f"registry URI {uri!r}: {bucket!r} is not a valid S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except RegistryError:
            raise RegistryError(f"registry URI {uri!r}: the prefix may not contain empty, '.' or '..' segments") from None
    return bucket, prefix


def _base64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


@dataclass(frozen=True)
class _Upload:
    """What an upload sent (its bytes' SHA-256 and size, and the S3 checksum of its parts: ``algorithm`` names it,
    as S3 spells it) and the checksum the server answered the write with: None from a server that does not take
    checksums."""

    moved: TransferredFile
    algorithm: str
    checksum: str
    acknowledged: str | None

    @property
    def field(self) -> str:
        """The response field of the checksum: ``ChecksumSHA256``, ``ChecksumCRC32``."""
        return f"Checksum{self.algorithm}"

    def matches(self, size: int, stored: str | None) -> bool:
        """Whether the object now stored is what was sent: its size, and where the server took checksums, the
        checksum it reports for the object, which must be the one it acknowledged and the one computed here."""
        if size != self.moved.size:
            return False
        if self.acknowledged is None:
            # Only a server that kept no checksum may report none; its objects can be compared by size alone.
            return stored is None or stored == self.checksum
        return self.acknowledged == self.checksum and stored == self.checksum


class S3Store:
    def __init__(self, bucket: str, prefix: str, transfer: TransferSettings):
        import boto3
        import botocore.session
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._transfer = transfer
        self._transfer_config = TransferConfig(
            multipart_threshold=transfer.part_size,
            multipart_chunksize=transfer.part_size,
            max_concurrency=transfer.max_concurrency,
            max_bandwidth=transfer.max_bandwidth,
            use_threads=True,
        )
        try:
            session = botocore.session.get_session()
            retries = {
                "mode": session.get_config_variable("retry_mode") or "adaptive",
                "total_max_attempts": int(session.get_config_variable("max_attempts") or DEFAULT_ATTEMPTS),
            }
            self._client = boto3.session.Session(botocore_session=session).client(
                "s3",
                config=Config(
                    retries=retries,
                    connect_timeout=10,
                    read_timeout=120,
                    max_pool_connections=max(10, 2 * transfer.max_concurrency),
                ),
            )
        except BotoCoreError as err:
            raise RegistryError(
                f"cannot set up the S3 client for {self.uri}: {type(err).__name__}; check AWS_PROFILE and ~/.aws/config"
            ) from None
        self._attempts = retries["total_max_attempts"]
        self._probe_lock = threading.Lock()
        self._conditional_writes_checked = False

    # --- keys and errors -------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        if prefix:
            check_key(prefix.rstrip("/"))
        base = f"{self.prefix}/" if self.prefix else ""
        return base + prefix

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _where(self, key: str | None) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    @staticmethod
    def _code(err: Exception) -> str | None:
        from botocore.exceptions import ClientError

        if isinstance(err, ClientError):
            error = err.response.get("Error", {})
            return str(error.get("Code") or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        return None

    @staticmethod
    def _is_precondition_failure(err: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(err, ClientError):
            return False
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status == 412 or S3Store._code(err) in ("PreconditionFailed", "ConditionalRequestConflict")

    def _translate(self, err: BaseException, action: str, key: str | None = None) -> BaseException:
        """A one-line RegistryError naming the cause; never the endpoint, the keys or botocore's text."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            CredentialRetrievalError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        cause: BaseException | None = err
        seen = set()
        where = self._where(key)
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, (ConnectionError, HTTPClientError)):
                return RegistryUnreachable(
                    f"cannot reach the S3 server for {self.uri} while {action} (gave up after {self._attempts} attempts, "
                    f"{type(cause).__name__}): check that the server is up and that AWS_ENDPOINT_URL or the AWS profile points at it"
                )
            if isinstance(cause, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
                return RegistryError(
                    f"no usable AWS credentials for {self.uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
                )
            if isinstance(cause, ClientError):
                code = self._code(cause)
                if code == "NoSuchBucket":
                    return NotFoundError(f"S3 bucket {self.bucket!r} does not exist: create it, or fix the registry URI {self.uri}")
                if code in _MISSING_CODES:
                    return NotFoundError(f"{where} does not exist")
                if code in _CREDENTIAL_CODES:
                    if self._bucket_missing():
                        return NotFoundError(f"S3 bucket {self.bucket!r} does not exist: create it, or fix the registry URI {self.uri}")
                    return RegistryError(
                        f"S3 refused the credentials while {action} {where} ({code}): check AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and that they may read and write this bucket"
                    )
                return RegistryError(f"S3 refused {action} {where}: {code}")
            cause = getattr(cause, "last_exception", None) or cause.__cause__ or cause.__context__
        return err

    def _bucket_missing(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            return self._code(err) in ("404", "NoSuchBucket", "NotFound")
        except BotoCoreError:
            return False
        return False

    @contextlib.contextmanager
    def _calling(self, action: str, key: str | None = None):
        try:
            yield
        except (PreconditionFailed, RegistryError):
            raise
        except Exception as err:
            translated = self._translate(err, action, key)
            if translated is err:
                raise
            raise translated from None

    # --- small objects ---------------------------------------------------------------------------

    def _put(self, key: str, data: bytes, **conditions: str) -> str:
        full = self._full(key)
        with self._calling("writing", key):
            try:
                response = self._client.put_object(Bucket=self.bucket, Key=full, Body=data, ChecksumAlgorithm="SHA256", **conditions)
            except Exception as err:
                # AWS answers If-Match on a missing key with 404, SeaweedFS with 412: both mean "changed".
                if self._is_precondition_failure(err) or ("IfMatch" in conditions and self._code(err) in _MISSING_CODES):
                    raise PreconditionFailed(key) from None
                raise
        return response["ETag"]

    def put_if_absent(self, key: str, data: bytes) -> str:
        return self._put(key, data, IfNoneMatch="*")

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        return self._put(key, data, IfMatch=etag)

    def put(self, key: str, data: bytes) -> str:
        return self._put(key, data)

    def get(self, key: str) -> StoredObject | None:
        full = self._full(key)
        with self._calling("reading", key):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full)
            except Exception as err:
                if self._code(err) in _MISSING_CODES:
                    return None
                raise
            return StoredObject(response["Body"].read(), response["ETag"])

    def head(self, key: str) -> ObjectInfo | None:
        full = self._full(key)
        with self._calling("reading", key):
            try:
                response = self._client.head_object(Bucket=self.bucket, Key=full)
            except Exception as err:
                if self._code(err) in _MISSING_CODES:
                    return None
                raise
        return ObjectInfo(key, response["ContentLength"], response["LastModified"])

    def list(self, prefix: str) -> list[ObjectInfo]:
        found = []
        with self._calling("listing", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix))
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(ObjectInfo(self._relative(item["Key"]), item["Size"], item["LastModified"]))
        return sorted(found, key=lambda info: info.key)

    def children(self, prefix: str) -> list[str]:
        full = self._full_prefix(prefix)
        names = []
        with self._calling("listing", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")
            for page in pages:
                names.extend(p["Prefix"][len(full) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(names)

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._calling("deleting", key):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    # --- large files -----------------------------------------------------------------------------

    def upload_file(self, key: str, path: Path) -> TransferredFile:
        full = self._full(key)
        with self._calling("uploading", key), open(path, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            if size < self._transfer.part_size:
                upload = self._put_whole(key, full, source)
            else:
                upload = self._put_in_parts(key, full, source, size)
        with self._calling("reading back", key):
            stored = self._client.head_object(Bucket=self.bucket, Key=full, **_CHECKSUM_MODE)
        if not upload.matches(stored["ContentLength"], stored.get(upload.field)):
            with contextlib.suppress(Exception):
                self._client.delete_object(Bucket=self.bucket, Key=full)
            raise IntegrityError(
                f"{self._where(key)}: what the server stored ({stored['ContentLength']} bytes, {upload.algorithm} checksum "
                f"{stored.get(upload.field)}) is not what was sent from {path} ({upload.moved.size} bytes, checksum "
                f"{upload.checksum}): the object was changed or corrupted on the server; it was deleted: publish again"
            )
        return upload.moved

    def _put_whole(self, key: str, full: str, source: BinaryIO) -> _Upload:
        body = source.read()
        digest = hashlib.sha256(body).digest()
        crashpoints.reached("mid-upload")
        self._throttle(len(body), time.monotonic())
        checksum = _base64(digest)
        response = self._sending(key, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=body, ChecksumSHA256=checksum))
        return _Upload(TransferredFile(digest.hex(), len(body)), "SHA256", checksum, response.get("ChecksumSHA256"))

    def _put_in_parts(self, key: str, full: str, source: BinaryIO, size: int) -> _Upload:
        """A multipart upload that reads the file once: each part is hashed into the file's SHA-256 as it is read,
        then sent with its own CRC32, which the server checks before it accepts the part.

        CRC32, not SHA-256, for the parts: it guards the transfer as well (the file's SHA-256, which every pull checks,
        guards the content), at 0.2 s of CPU per GiB where a second SHA-256 took 0.5 s, on both client and server."""
        from s3transfer.utils import ChunksizeAdjuster

        part_size = ChunksizeAdjuster().adjust_chunksize(self._transfer.part_size, size)
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32")["UploadId"]
        whole = hashlib.sha256()
        moved = 0
        started = time.monotonic()
        # Parts read ahead of the network wait here: memory stays at max_concurrency parts.
        slots = threading.BoundedSemaphore(self._transfer.max_concurrency)
        failures: list[BaseException] = []

        def finished(future: Future) -> None:
            slots.release()
            if future.exception() is not None:
                failures.append(future.exception())

        try:
            with ThreadPoolExecutor(max_workers=self._transfer.max_concurrency) as senders:
                sent = []
                while not failures:
                    slots.acquire()
                    body = source.read(part_size)
                    if not body:
                        slots.release()
                        break
                    whole.update(body)
                    moved += len(body)
                    future = senders.submit(self._put_part, key, full, upload_id, len(sent) + 1, body)
                    future.add_done_callback(finished)
                    sent.append(future)
                    crashpoints.reached("mid-upload")
                    self._throttle(moved, started)
                parts = [future.result() for future in sent]
            listing = [part for part, _ in parts]
            completed = self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": listing}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            raise
        composite = zlib.crc32(b"".join(digest for _, digest in parts)).to_bytes(4, "big")
        return _Upload(
            TransferredFile(whole.hexdigest(), moved), "CRC32", f"{_base64(composite)}-{len(parts)}", completed.get("ChecksumCRC32")
        )

    def _put_part(self, key: str, full: str, upload_id: str, number: int, body: bytes) -> tuple[dict[str, Any], bytes]:
        digest = zlib.crc32(body).to_bytes(4, "big")
        checksum = _base64(digest)
        response = self._sending(
            key,
            lambda: self._client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body, ChecksumCRC32=checksum
            ),
            part=number,
        )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": checksum}, digest

    def _sending(self, key: str, send: Callable[[], dict[str, Any]], part: int | None = None) -> dict[str, Any]:
        try:
            return send()
        except Exception as err:
            if self._code(err) in _CHECKSUM_MISMATCH_CODES:
                what = f"part {part} of {self._where(key)}" if part else self._where(key)
                raise IntegrityError(
                    f"{what} was corrupted on its way to the server (the server's checksum of the bytes it received is not the "
                    "one sent with them) and was refused; nothing was stored: publish again"
                ) from None
            raise

    def _throttle(self, moved: int, started: float) -> None:
        if self._transfer.max_bandwidth:
            time.sleep(max(0.0, moved / self._transfer.max_bandwidth - (time.monotonic() - started)))

    def download_file(self, key: str, dest: Path) -> TransferredFile:
        with open(dest, "wb") as handle:
            return self.download_into(key, handle)

    def download_into(self, key: str, handle: BinaryIO | Writable) -> TransferredFile:
        full = self._full(key)
        with self._calling("downloading", key), HashingWriter(handle) as written:
            self._client.download_fileobj(self.bucket, full, written, Config=self._transfer_config)
            return written.result()

    def pending_uploads(self, prefix: str) -> list[PendingUpload]:
        found = []
        with self._calling("listing unfinished uploads of", prefix):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix))
            for page in pages:
                for upload in page.get("Uploads", []):
                    found.append(PendingUpload(self._relative(upload["Key"]), upload["UploadId"], upload["Initiated"]))
        return sorted(found, key=lambda upload: (upload.key, upload.upload_id))

    def abort_upload(self, upload: PendingUpload) -> None:
        full = self._full(upload.key)
        with self._calling("aborting an unfinished upload of", upload.key):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload.upload_id)

    # --- capability probe ------------------------------------------------------------------------

    def check_conditional_writes(self) -> None:
        with self._probe_lock:
            if self._conditional_writes_checked:
                return
            key = f"{_PROBE_PREFIX}/{uuid.uuid4().hex}"
            try:
                self._probe(key)
            finally:
                with contextlib.suppress(RegistryError):
                    self.delete(key)
            self._conditional_writes_checked = True

    def _probe(self, key: str) -> None:
        def refusal(what: str) -> RegistryError:
            return RegistryError(
                f"the S3 server behind {self.uri} does not enforce conditional writes ({what}); publishing needs them to "
                "keep versions immutable and aliases consistent: use a server that does (AWS S3, or a recent SeaweedFS or MinIO)"
            )

        first = self.put_if_absent(key, b"first")
        try:
            self.put_if_absent(key, b"second")
        except PreconditionFailed:
            pass
        else:
            raise refusal("it accepted 'If-None-Match: *' for an existing object")
        try:
            self.put_if_match(key, b"third", '"00000000000000000000000000000000"')
        except PreconditionFailed:
            pass
        else:
            raise refusal("it accepted 'If-Match' with a stale ETag")
        try:
            self.put_if_match(f"{key}-absent", b"fourth", first)
        except PreconditionFailed:
            pass
        else:
            self.delete(f"{key}-absent")
            raise refusal("it accepted 'If-Match' for a missing object")
        try:
            self.put_if_match(key, b"fifth", first)
        except PreconditionFailed:
            raise refusal("it refused 'If-Match' with the current ETag") from None
