from unittest import mock

import pytest

from sdswarm.cli import main
from tests.conftest import ROOT


def test_a_joiner_may_not_set_the_swarms_keys(tmp_path, capsys):
    # refused before any network traffic: the address is never asked
    code = main(["join", "127.0.0.1:9", f"--output={tmp_path}", "--set=lr=1", "--set=train.max_epochs=3"])
    err = capsys.readouterr().err
    assert code == 2 and "lr, train.max_epochs: set by the swarm" in err and "train.batch_size" in err


def test_a_bad_key_value_pair_is_refused_with_an_example(capsys):
    assert main(["mother", "configs/tiny.yaml", "--set=train.batch_size"]) == 2
    assert "expected KEY=VALUE, e.g. --set train.max_steps=100" in capsys.readouterr().err


def test_a_joiner_may_not_choose_another_index_hash(tmp_path, capsys):
    code = main(["join", "127.0.0.1:9", f"--output={tmp_path}", "--set=data.index_sha256=" + "ab" * 32])
    assert code == 2 and "data.index_sha256: set by the swarm" in capsys.readouterr().err


def test_the_howto_config_on_the_demo_data_is_refused_before_any_work(capsys):
    assert main(["mother", "configs/sd_1-5.yaml", "--set=data.source=builtin:demo"]) == 2
    err = capsys.readouterr().err
    assert "data.source is builtin:demo" in err and "sdswarm index build --from-dump" in err


def hub_error(kind: type[Exception]) -> Exception:
    import httpx2  # the hub client's HTTP library

    url = "https://huggingface.co/runwayml/stable-diffusion-v1-5/resolve/main/model_index.json"
    if kind is httpx2.ConnectError:
        return kind("[Errno -2] Name or service not known")
    return kind("404 Client Error: Repository Not Found",
                response=httpx2.Response(404, request=httpx2.Request("HEAD", url)))


@pytest.mark.parametrize("kind", ["not found", "unreachable"])
def test_a_model_the_hub_cannot_give_is_one_error_naming_the_maintained_copy(tmp_path, capsys, kind):
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    from sdswarm import node

    error = hub_error(RepositoryNotFoundError if kind == "not found" else httpx2.ConnectError)
    with mock.patch("sdswarm.model.loading.try_to_load_from_cache", return_value=None), \
            mock.patch("sdswarm.model.loading.get_hf_file_metadata", side_effect=error) as asked, \
            mock.patch.object(node, "start_dht", side_effect=AssertionError("the DHT started")), \
            mock.patch.object(node, "find_index", side_effect=AssertionError("the data started")):
        code = main(["mother", "configs/sd_1-5.yaml", f"--output={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and asked.call_count == 1, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "model runwayml/stable-diffusion-v1-5" in err and "model_index.json" in err
    assert "--set model=stable-diffusion-v1-5/stable-diffusion-v1-5" in err
    assert ("no such repository" if kind == "not found" else "cannot be reached") in err


def test_the_howto_config_without_its_index_says_where_to_put_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no danbooru.db here
    with mock.patch("sdswarm.model.loading.check_model") as checked, \
            mock.patch("sdswarm.node.check_model", checked):
        code = main(["mother", str(ROOT / "configs" / "sd_1-5.yaml"), f"--output={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "data.index 'danbooru.db'" in err and str(tmp_path / "danbooru.db") in err
    assert "put the how-to's SQLite db there" in err and "sdswarm index build --from-dump" in err
