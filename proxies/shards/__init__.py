"""Sharded latent/text datasets: a fixed-record format, a world-size-independent sample order with exact resume,
object stores through a bounded cache, and a resumable distributed precompute."""

from .dataset import Draws, ShardedDataset, StepSampler, TrainStream, is_sharded, stream_loader
from .format import RecordSpec, ShardError, ShardInfo
from .order import EpochOrder, rank_positions
from .writer import DatasetWriter, convert_cache, make_records

__all__ = ["DatasetWriter", "Draws", "EpochOrder", "RecordSpec", "ShardError", "ShardInfo", "ShardedDataset",
           "StepSampler", "TrainStream", "convert_cache", "is_sharded", "make_records", "rank_positions",
           "stream_loader"]
