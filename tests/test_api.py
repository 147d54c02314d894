"""The running app driven with gradio_client, as a script would use it."""

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from vggattn import app
from server import running_app

ASSET = str(app.HERE / "assets" / "church.jpg")


@pytest.fixture(scope="module")
def client():
    with running_app() as url:
        yield Client(url, verbose=False)


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/analyze", "/attention_at", "/upload", "/click"} <= names


def test_analyze(client):
    labels, gammas = client.predict(handle_file(ASSET), api_name="/analyze")
    assert len(labels["confidences"]) == 5
    assert set(gammas) == {"features.14", "features.22", "features.30"}


def test_attention_at_returns_three_overlays(client):
    *paths, info = client.predict(handle_file(ASSET), 200, 20, api_name="/attention_at")
    images = [np.asarray(Image.open(p)) for p in paths]
    assert all(im.shape == (224, 224, 3) for im in images)
    assert [i["grid"] for i in info] == [[16, 16], [8, 8], [4, 4]]
    assert info[0]["query_index"] == 1 * 16 + 14  # x=200 -> col 14 of 16, y=20 -> row 1
    *other, info2 = client.predict(handle_file(ASSET), 5, 210, api_name="/attention_at")
    assert info2[0]["query_index"] == 15 * 16 + 0
    assert not np.array_equal(images[0], np.asarray(Image.open(other[0])))


def test_bad_image_is_a_clear_error_and_the_app_keeps_serving(client, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"this is text, renamed .jpg")
    with pytest.raises(Exception, match="not an image in a supported format"):
        client.predict(handle_file(str(bad)), api_name="/analyze")
    labels, _ = client.predict(handle_file(ASSET), api_name="/analyze")
    assert len(labels["confidences"]) == 5
