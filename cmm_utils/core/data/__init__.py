"""Data: manifests, readers, in-memory datasets with splits, continual-learning scenarios."""
from cmm_utils.core.data.datasets import DatasetSplits, LabeledImages, load_dataset, make_split, registered_names
from cmm_utils.core.data.decode import decode_images
from cmm_utils.core.data.leakage import remove_source_images
from cmm_utils.core.data.manifest import DataError, Manifest, data_root, ensure_files, get_manifest, load_manifests
from cmm_utils.core.data.scenarios import Scenario, Task, class_incremental, dataset_incremental, task_class_splits

__all__ = ["DatasetSplits", "LabeledImages", "load_dataset", "make_split", "registered_names", "decode_images",
           "remove_source_images", "DataError", "Manifest", "data_root", "ensure_files", "get_manifest",
           "load_manifests", "Scenario", "Task", "class_incremental", "dataset_incremental", "task_class_splits"]
