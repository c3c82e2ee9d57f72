"""A batch of slides, from the inputs to published per-slide folders.

- :mod:`~wsi_pipeline.batch.inputs`: files, folders and CSVs -> slide jobs with stable names;
- :mod:`~wsi_pipeline.batch.plan`: the model, tile geometry and settings checksum, once;
- :mod:`~wsi_pipeline.batch.marker`: slide identity, output manifest, the done marker;
- :mod:`~wsi_pipeline.batch.checkpoint`: the completed tiles of an unfinished slide, for resume;
- :mod:`~wsi_pipeline.batch.one_slide`: one slide end to end, skip / partial / resume / publish;
- :mod:`~wsi_pipeline.batch.lock`: one run per out folder;
- :mod:`~wsi_pipeline.batch.runner`: the batch with resume, process list and batch report.
"""

from wsi_pipeline.batch.inputs import SlideJob, assign_names, collect_jobs
from wsi_pipeline.batch.lock import LOCK_NAME, out_folder_lock
from wsi_pipeline.batch.marker import DONE_MARKER, OUTPUT_FORMAT, read_done_marker, slide_identity
from wsi_pipeline.batch.one_slide import SlideOutcome, SlideRun, partial_dir, process_slide, run_slide_job
from wsi_pipeline.batch.plan import ModelInfo, default_tile_size, prepare_model, settings_checksum, zarr_chunk
from wsi_pipeline.batch.runner import PROCESS_LIST, BatchSummary, read_process_list, run_batch, write_process_list

__all__ = [
    "DONE_MARKER",
    "LOCK_NAME",
    "OUTPUT_FORMAT",
    "PROCESS_LIST",
    "BatchSummary",
    "ModelInfo",
    "SlideJob",
    "SlideOutcome",
    "SlideRun",
    "assign_names",
    "collect_jobs",
    "default_tile_size",
    "out_folder_lock",
    "partial_dir",
    "prepare_model",
    "process_slide",
    "read_done_marker",
    "read_process_list",
    "run_batch",
    "run_slide_job",
    "settings_checksum",
    "slide_identity",
    "write_process_list",
    "zarr_chunk",
]
