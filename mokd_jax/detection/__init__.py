"""Object detection: a RetinaNet-FPN detector, its losses, post-processing, COCO-format
data and COCO box AP, driven by the same trainer and aggregators as classification."""
