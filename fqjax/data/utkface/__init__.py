"""UTKFace as a TFDS dataset built from the manual download.

  prepare(data_dir, manual_dir, image_size)   -> stats (skipped malformed names, ...)
  read_prepared(data_dir, image_size)         -> {'image', 'race', 'gender', 'age', 'file_name'}
  python -m fqjax.data.utkface --manual_dir M --data_dir D --image_size 64

files.py parses names, extracts archives safely and decodes images (no TFDS);
builder.py holds the TFDS builder. Importing this package does not import
tensorflow_datasets.
"""
from fqjax.data.utkface.builder import (PREDEFINED_SIZES, VERSION, builder_class,
                                        default_data_dir, main, prepare, prepared_stats,
                                        read_prepared)
from fqjax.data.utkface.files import (GENDER_NAMES, MANUAL_DOWNLOAD_INSTRUCTIONS, RACE_NAMES,
                                      Attributes, MalformedName, UnsafeArchiveError,
                                      is_jpeg_name, load_image, parse_file_name, safe_extract,
                                      scan_manual_dir)

__all__ = ["GENDER_NAMES", "MANUAL_DOWNLOAD_INSTRUCTIONS", "PREDEFINED_SIZES", "RACE_NAMES",
           "VERSION", "Attributes", "MalformedName", "UnsafeArchiveError", "builder_class",
           "default_data_dir", "is_jpeg_name", "load_image", "main", "parse_file_name",
           "prepare", "prepared_stats", "read_prepared", "safe_extract", "scan_manual_dir"]
