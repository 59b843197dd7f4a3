import pytest

from sdswarm.hosts import redirect_allowed


@pytest.mark.parametrize(("url", "target", "allowed"), [
    ("https://bucket.example/a.png", "https://bucket.example/b/a.png", True),  # same host
    ("https://bucket.example/a.png", "https://eu.bucket.example/a.png", True),  # a public host (a region)
    ("http://127.0.0.1:9000/a.png", "http://127.0.0.1:9000/b.png", True),  # the user's own local bucket
    ("https://bucket.example/a.png", "http://169.254.169.254/latest/meta-data", False),  # cloud metadata
    ("https://bucket.example/a.png", "http://localhost:8080/admin", False),
    ("https://bucket.example/a.png", "http://0x7f000001/", False),  # 127.0.0.1 in a resolver's other spelling
    ("https://bucket.example/a.png", "http://nas.lan/photos", False),
    ("http://127.0.0.1:9000/a.png", "http://192.168.1.5/a.png", False),  # another host of the network
    ("https://bucket.example/a.png", "file:///etc/passwd", False),
])
def test_a_redirect_stays_on_its_host_or_goes_to_a_public_one(url, target, allowed):
    assert redirect_allowed(url, target) is allowed
