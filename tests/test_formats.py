"""hi.read_tar: WebDataset-layout tar shards, parsed without tarfile: the same samples as
tarfile and webdataset give (long names, prefixes, directories, every tar format), a resume that
seeks, and clear errors for a broken file."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

import horovod_iter as hi


def write(path, members, fmt=tarfile.GNU_FORMAT, dirs=False):
    with tarfile.open(path, "w", format=fmt) as tar:
        if dirs:
            info = tarfile.TarInfo("data")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def samples(n, prefix="data/"):
    out = []
    for i in range(n):
        key = f"{prefix}{i:06d}"
        out += [(f"{key}.json", json.dumps({"i": i}).encode()),
                (f"{key}.bin", bytes([i % 256]) * i), (f"{key}.seg.png", b"png%d" % i)]
    return out


def expected(members):
    got: dict = {}
    order = []
    for name, data in members:
        base = name.rsplit("/", 1)[-1]
        key = name[:len(name) - len(base)] + base.split(".", 1)[0]
        ext = base.split(".", 1)[1] if "." in base else ""
        if key not in got:
            got[key] = {"__key__": key}
            order.append(key)
        got[key][ext] = data
    return [got[k] for k in order]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_the_samples_of_every_tar_format_with_long_names(tmp_path, fmt):
    deep = "d" * 60 + "/" + "e" * 60 + "/"  # > 100 bytes: a GNU long name, pax path or prefix
    members = samples(30) + samples(3, prefix=deep)
    path = tmp_path / "s.tar"
    write(path, members, fmt, dirs=True)
    assert list(hi.read_tar(path)) == expected(members)
    assert list(hi.read_tar(str(path), start=31)) == expected(members)[31:]
    assert list(hi.read_tar(path, start=99)) == []


def test_the_same_samples_as_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    members = samples(40)
    path = tmp_path / "s.tar"
    write(path, members)
    theirs = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
              for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]
    assert list(hi.read_tar(path)) == theirs


def test_a_broken_tar_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "s.tar"
    write(path, samples(5))
    data = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:2000])
    with pytest.raises(ValueError, match=r"cut\.tar: truncated tar"):
        list(hi.read_tar(tmp_path / "cut.tar"))
    (tmp_path / "cut2.tar").write_bytes(data[:1536])  # at a member's end
    with pytest.raises(ValueError, match=r"cut2\.tar: truncated tar"):
        list(hi.read_tar(tmp_path / "cut2.tar"))
    (tmp_path / "junk.tar").write_bytes(b"x" * 1024)
    with pytest.raises(ValueError, match=r"junk\.tar: not a tar file"):
        list(hi.read_tar(tmp_path / "junk.tar"))
    (tmp_path / "empty.tar").write_bytes(b"")
    assert list(hi.read_tar(tmp_path / "empty.tar")) == []


def test_through_a_sharded_dataset_each_sample_once_and_a_seek_on_resume(tmp_path):
    paths, total = [], 0
    for s, n in enumerate([7, 0, 12, 5]):
        p = tmp_path / f"s{s}.tar"
        write(p, samples(n, prefix=f"s{s}/"))
        paths.append(str(p))
        total += n
    ds = hi.ShardedDataset(paths, hi.read_tar, seed=1, rank=0, num_replicas=1)
    keys = [s["__key__"] for s in ds]
    assert sorted(keys) == sorted(f"s{s}/{i:06d}" for s, n in enumerate([7, 0, 12, 5])
                                  for i in range(n))
    assert ds._seeks  # read_tar takes start=
