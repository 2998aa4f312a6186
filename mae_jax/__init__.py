"""mae_jax: Masked Autoencoders in JAX/Flax."""

import os as _os

# Set before any library reads them (they are read at import), each only where the user has not:
# - etils.epath (used by orbax and by runtime/paths.py) picks TensorFlow's gfile for gs:// paths
#   whenever TensorFlow is installed (it is, for tfds' dataset preparation); fsspec (gcsfs) is
#   the backend the `gcs` extra installs and the one that honours STORAGE_EMULATOR_HOST.
_os.environ.setdefault("EPATH_USE_TF", "false")
# - TensorFlow, imported by tfds to prepare a data set, prints CPU-feature notices on import.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# - A local GCS API named for gcsfs (STORAGE_EMULATOR_HOST) serves tensorstore's writes too; gcsfs
#   does not ask it for the bucket's layout (an API of the real service only: it warns each time).
if _os.environ.get("STORAGE_EMULATOR_HOST"):
  _os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", _os.environ["STORAGE_EMULATOR_HOST"])
  _os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
