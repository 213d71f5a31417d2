"""kubetune.storage: every object-store call of kubetune (DESIGN.md, "Storage").

``open_store(uri, storage=None)`` returns a :class:`Store` rooted at ``uri``:

- ``s3://bucket/prefix`` through boto3 (:mod:`kubetune.storage.s3`); the endpoint and region come
  from a :class:`kubetune.api.common.StorageConfig` or the environment (``AWS_ENDPOINT_URL``,
  ``AWS_REGION``); credentials only from the environment or the pod's workload identity.
- ``file:///absolute/path`` for the local runtime (:mod:`kubetune.storage.files`).

Keys are ``/``-separated paths relative to the store's root (``checkpoints/step-10/model.bin``).
The API (see :class:`kubetune.storage.stores.Store`):

=============================================  ==============================================
``read_bytes(key)`` / ``write_bytes(key, b)``  whole objects; file:// writes are atomic (tmp + rename)
``read_text`` / ``write_text``, ``read_json`` / ``write_json``  conveniences over the above
``iter_chunks(key)``                           streaming read; s3 resumes with Range after a dropped connection
``exists(key)``                                the object exists
``list(prefix="")``                            sorted keys under a string prefix (recursive)
``delete(key)`` / ``delete_prefix(prefix)``    remove one object / everything under a prefix
``upload_file(path, key)`` / ``download_file(key, path)``  one file; downloads land atomically
``upload_dir(dir, prefix)`` / ``download_dir(prefix, dir)``  parallel; ``manifest.json`` goes LAST
``child(prefix)`` / ``uri_for(key)``          a store rooted deeper / the full URI of a key
=============================================  ==============================================

Failures raise :class:`StorageError` (a missing object: :class:`ObjectNotFound`, also a
``FileNotFoundError``) with the URI in the message. Transient S3 failures (5xx, throttling,
dropped connections) are retried with exponential backoff: botocore's ``standard`` retry mode
for every request, plus kubetune's own wrapper around what botocore does not cover (a response
body that breaks off mid-stream, a transfer whose parts ran out of attempts).

:mod:`kubetune.storage.manifests` writes and verifies ``manifest.json`` (sha256 of every file).
"""

from kubetune.storage.stores import ObjectNotFound, StorageError, Store, open_store

__all__ = ["ObjectNotFound", "StorageError", "Store", "open_store"]
