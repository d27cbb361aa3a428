"""The S3 store: any S3-compatible endpoint (AWS S3, MinIO, SeaweedFS) through boto3.

The endpoint, region and credentials come only from the standard AWS settings
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, the environment, ``~/.aws``); none of them is ever
put in a message. Conditional writes use ``If-None-Match: *`` and ``If-Match``; since some
S3-compatible servers accept those headers and ignore them, the first write through a store
probes that the server really enforces them. Retries are adaptive unless ``AWS_RETRY_MODE``
says otherwise; large files move as parallel multipart transfers with SHA-256 checksums
checked by the server for every part.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trtforge.errors import IntegrityError, NotFoundError, RegistryError
from trtforge.registry import crashpoints
from trtforge.registry.storage import (
    FileDigest,
    ObjectInfo,
    PendingUpload,
    PreconditionFailed,
    RegistryUnreachable,
    StoredObject,
    TransferSettings,
    UploadedFile,
    check_key,
    digest_file,
)

DEFAULT_ATTEMPTS = 6
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "403"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_PROBE_PREFIX = "_capability-probe"
_CHECKSUM_MODE = {"ChecksumMode": "ENABLED"}


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


def _expected_checksum(digest: FileDigest) -> str:
    """The ``ChecksumSHA256`` S3 reports: of the object, or of its part checksums plus ``-N`` for multipart."""
    if not digest.part_digests:
        return base64.b64encode(bytes.fromhex(digest.sha256)).decode()
    composite = hashlib.sha256(b"".join(digest.part_digests)).digest()
    return f"{base64.b64encode(composite).decode()}-{len(digest.part_digests)}"


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
        except PreconditionFailed:
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

    def upload_file(self, key: str, path: Path) -> UploadedFile:
        from s3transfer.utils import ChunksizeAdjuster

        full = self._full(key)
        size = path.stat().st_size
        # s3transfer goes multipart from the threshold on, and may enlarge parts for huge files.
        part_size = ChunksizeAdjuster().adjust_chunksize(self._transfer.part_size, size) if size >= self._transfer.part_size else None
        # Hash while uploading (hashlib releases the GIL); the read-back below ties the two together.
        with ThreadPoolExecutor(max_workers=1) as hasher:
            hashing = hasher.submit(digest_file, path, part_size)
            try:
                self._client.upload_file(
                    str(path),
                    self.bucket,
                    full,
                    ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                    Config=self._transfer_config,
                    Callback=crashpoints.progress_hook("mid-upload"),
                )
            except Exception as err:
                self._abort_uploads_of(full)
                translated = self._translate(err, "uploading", key)
                if translated is err:
                    raise
                raise translated from None
            digest = hashing.result()
        with self._calling("reading back", key):
            stored = self._client.head_object(Bucket=self.bucket, Key=full, **_CHECKSUM_MODE)
        checksum = stored.get("ChecksumSHA256")
        if stored["ContentLength"] != digest.size or (checksum is not None and checksum != _expected_checksum(digest)):
            with contextlib.suppress(Exception):
                self._client.delete_object(Bucket=self.bucket, Key=full)
            raise IntegrityError(
                f"{self._where(key)}: what the server stored does not match {path} (size or SHA-256 differ); "
                "the file changed while it was uploaded, or the transfer was corrupted: publish again"
            )
        return UploadedFile(digest.sha256, digest.size)

    def _abort_uploads_of(self, full_key: str) -> None:
        """Abort unfinished multipart uploads of a key this publisher owns; best effort, gc is the backstop."""
        with contextlib.suppress(Exception):
            response = self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=full_key)
            for upload in response.get("Uploads", []):
                if upload["Key"] == full_key:
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload["UploadId"])

    def download_file(self, key: str, dest: Path) -> None:
        full = self._full(key)
        with self._calling("downloading", key):
            self._client.download_file(self.bucket, full, str(dest), Config=self._transfer_config)

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
