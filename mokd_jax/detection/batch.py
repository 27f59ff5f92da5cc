"""`DetectionBatch`: what a detection dataset yields and the detection steps consume.

Every array has a static shape, so that a step compiles once: images are padded to one
size and each image's boxes to `max_boxes` rows, with masks saying which rows are real.
"""

from typing import NamedTuple

import numpy as np


class DetectionBatch(NamedTuple):
    """A batch of B images, each with up to M ground-truth boxes (numpy or jax arrays).

    Boxes are [x1, y1, x2, y2] in pixels of the resized image (the image as the model sees
    it, before padding); `scales` maps them back: original = resized / scale.
    """

    images: np.ndarray  # uint8 [B, H, W, 3], zero-padded at the bottom and right
    boxes: np.ndarray  # float32 [B, M, 4]
    labels: np.ndarray  # int32 [B, M], contiguous class indices in [0, num_classes)
    box_mask: np.ndarray  # bool [B, M]: the row is a real (non-crowd) box
    image_ids: np.ndarray  # int64 [B]: the dataset's image id (COCO `image_id`)
    scales: np.ndarray  # float32 [B]: resized size / original size
    image_sizes: np.ndarray  # int32 [B, 2]: (height, width) of the resized image
    example_mask: np.ndarray  # bool [B]: False for the padding rows of a last eval batch
