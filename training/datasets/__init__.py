"""Dataset engine: folders of images and clips with captions -> bucketed, lazily decoded samples.

No ComfyUI here; the dataset nodes wrap `scan_folder` and check allowed roots themselves.
"""
from .buckets import BucketConfig, bucket_for, fit, make_batches, make_buckets, nearest_bucket
from .captions import CaptionConfig, apply_trigger, final_caption, read_caption_file, shuffle_tags
from .errors import DatasetError, DatasetWarning
from .images import IMAGE_SUFFIXES, image_size, load_rgb, to_rgb
from .scan import Dataset, DatasetConfig, DatasetItem, scan_folder
from .video import (VIDEO_SUFFIXES, ClipConfig, ClipMode, FrameRule, VideoInfo, clip_frame_indices,
                    clip_starts, decode_frames, probe_video, resample)

__all__ = [
    "BucketConfig", "bucket_for", "fit", "make_batches", "make_buckets", "nearest_bucket",
    "CaptionConfig", "apply_trigger", "final_caption", "read_caption_file", "shuffle_tags",
    "DatasetError", "DatasetWarning", "IMAGE_SUFFIXES", "image_size", "load_rgb", "to_rgb",
    "Dataset", "DatasetConfig", "DatasetItem", "scan_folder",
    "VIDEO_SUFFIXES", "ClipConfig", "ClipMode", "FrameRule", "VideoInfo", "clip_frame_indices",
    "clip_starts", "decode_frames", "probe_video", "resample",
]
