from sdswarm.cli import main


def test_a_joiner_may_not_set_the_swarms_keys(tmp_path, capsys):
    # refused before any network traffic: the address is never asked
    code = main(["join", "127.0.0.1:9", f"--output={tmp_path}", "--set=lr=1", "--set=train.max_epochs=3"])
    err = capsys.readouterr().err
    assert code == 2 and "lr, train.max_epochs: set by the swarm" in err and "train.batch_size" in err


def test_a_bad_key_value_pair_is_refused_with_an_example(capsys):
    assert main(["mother", "configs/tiny.yaml", "--set=train.batch_size"]) == 2
    assert "expected KEY=VALUE, e.g. --set train.max_steps=100" in capsys.readouterr().err
