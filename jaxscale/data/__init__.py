"""Input: data sources by name and the batches built from them."""
from jaxscale.data.pipeline import TrainLoader, eval_batches, num_eval_batches
from jaxscale.data.sources import Dataset, check_dataset_name, load_dataset
from jaxscale.data.transforms import EvalTransform, TrainTransform

__all__ = ["Dataset", "EvalTransform", "TrainLoader", "TrainTransform", "check_dataset_name",
           "eval_batches", "load_dataset", "num_eval_batches"]
