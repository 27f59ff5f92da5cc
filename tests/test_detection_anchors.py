"""RetinaNet anchors (mokd_jax.detection.anchors): identical to those of torchvision's
`retinanet_resnet50_fpn` on the feature maps its own backbone produces, for image sides
divisible by 128 and not; and hand-computed cell anchors and spacing."""

import numpy as np
import pytest

from mokd_jax.detection import anchors
from mokd_jax.errors import InputError

torch = pytest.importorskip("torch")
from torchvision_shim import import_torchvision  # noqa: E402  (needs torch)

torchvision = import_torchvision()
from torchvision.models.detection.image_list import ImageList  # noqa: E402


@pytest.fixture(scope="module")
def retinanet():
    model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    return model.eval()


@pytest.mark.parametrize("image_size", [(128, 256), (100, 150)])
def test_identical_to_torchvision_retinanet(retinanet, image_size):
    images = torch.zeros(1, 3, *image_size)
    with torch.no_grad():
        feature_maps = list(retinanet.backbone(images).values())
    assert [tuple(f.shape[-2:]) for f in feature_maps] == list(
        anchors.feature_map_sizes(image_size)
    )
    expected = retinanet.anchor_generator(ImageList(images, [image_size]), feature_maps)[0]
    ours = anchors.retinanet_anchors(image_size)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected.numpy())


def test_hand_computed_cell_anchors_and_spacing():
    assert anchors.level_sizes(32) == (32, 40, 50)
    assert anchors.level_sizes(512) == (512, 645, 812)
    # Ratio 0.5 (wide): 45.25 x 22.63 halved and rounded; ratio 1: 32 x 32; ratio 2: tall.
    cell = anchors.cell_anchors((32, 40, 50))
    np.testing.assert_array_equal(
        cell[[0, 3, 6]], [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]
    )
    all_anchors = anchors.retinanet_anchors((128, 128))
    areas = [16 * 16, 8 * 8, 4 * 4, 2 * 2, 1]
    assert all_anchors.shape == (anchors.ANCHORS_PER_LOCATION * sum(areas), 4)
    # The second P3 location is one stride (8 px) to the right of the first.
    np.testing.assert_array_equal(all_anchors[9:18], all_anchors[:9] + [8, 0, 8, 0])
    # The second row of P3 starts one stride down.
    np.testing.assert_array_equal(all_anchors[16 * 9 : 17 * 9], all_anchors[:9] + [0, 8, 0, 8])


def test_feature_map_sizes_round_up():
    assert anchors.feature_map_sizes((100, 129)) == ((13, 17), (7, 9), (4, 5), (2, 3), (1, 2))


def test_bad_image_size_names_the_field():
    with pytest.raises(InputError, match=r"image_size\[1\]=0 is not allowed: an integer >= 1"):
        anchors.retinanet_anchors((64, 0))
