"""Document store, FAISS index and ingest, with the real MiniLM embedder."""

import json

import pytest

from indexes import Document, KnowledgeBase
from indexes.ingest import DocumentError, ingest, read_corpus

DOCS = [
    Document("cats", "The cat sat on the mat and purred all afternoon.", "Cats"),
    Document("paris", "Paris is the capital and largest city of France.", "Paris"),
    Document("qcd", "Quantum chromodynamics describes the strong interaction between quarks.", "QCD"),
]


def test_add_search_update_delete_and_reopen(tmp_path, embedder):
    kb = KnowledgeBase(tmp_path, embedder)
    assert [s for _, s in kb.upsert(DOCS)] == ["created"] * 3
    hits = kb.search("What is the capital of France?", 2)
    assert hits[0].doc_id == "paris" and hits[0].score > hits[1].score
    assert [s for _, s in kb.upsert(DOCS[:1])] == ["unchanged"]
    assert kb.upsert([Document("paris", "Berlin is the capital of Germany.", "Berlin")]) == [("paris", "updated")]
    assert kb.store.get("paris").title == "Berlin"
    assert kb.delete("cats") and not kb.delete("cats")
    assert "cats" not in [h.doc_id for h in kb.search("cat on a mat", 3)]
    before = kb.search("strong interaction of quarks", 3)
    kb.close()
    kb2 = KnowledgeBase(tmp_path, embedder)
    assert kb2.count() == 2
    assert kb2.search("strong interaction of quarks", 3) == before


def test_stale_or_corrupt_index_file_is_rebuilt_from_the_store(tmp_path, embedder):
    kb = KnowledgeBase(tmp_path, embedder)
    kb.upsert(DOCS)
    expected = kb.search("capital of France", 3)
    kb.close()
    index = tmp_path / "index.faiss"
    index.write_bytes(index.read_bytes()[:50])  # truncated, as by a crash mid-write
    kb = KnowledgeBase(tmp_path, embedder)
    assert kb.search("capital of France", 3) == expected
    kb.close()


def test_a_second_process_ingesting_is_seen_by_search(tmp_path, embedder):
    server_side = KnowledgeBase(tmp_path, embedder)
    server_side.upsert(DOCS[:1])
    cli_side = KnowledgeBase(tmp_path, embedder)
    cli_side.upsert(DOCS[1:])
    assert server_side.search("capital of France", 1)[0].doc_id == "paris"


def test_read_corpus_validates_every_line_before_writing(tmp_path, embedder):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) for d in DOCS) + "\n")
    docs = read_corpus(good)
    kb = KnowledgeBase(tmp_path / "kb", embedder)
    rep = ingest(kb, docs, batch_size=2, progress=False)
    assert (rep.created, rep.unchanged) == (3, 0)
    assert ingest(kb, docs, progress=False).unchanged == 3
    for bad, msg in [('{"id": "a"}', "text"), ('{"text": "x"}', "id"), ("not json", "not valid JSON"),
                     ('{"id": "a", "text": "   "}', "text")]:
        p = tmp_path / "bad.jsonl"
        p.write_text(json.dumps({"id": "ok", "text": "fine"}) + "\n" + bad + "\n")
        with pytest.raises(DocumentError, match=msg) as e:
            read_corpus(p)
        assert ":2" in str(e.value)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"id": "big", "text": "x" * 101}) + "\n")
    with pytest.raises(DocumentError) as e:
        read_corpus(big, max_chars=100)
    assert e.value.too_large


def test_a_crash_between_commit_and_index_save_loses_nothing(tmp_path, embedder):
    """The store commit is the acknowledgement; the index file may lag behind it."""
    kb = KnowledgeBase(tmp_path, embedder)
    kb.upsert(DOCS[:1])
    # what a crash right after the SQLite commit leaves: the row is there, the saved index is not updated
    kb.store.upsert([Document("paris", DOCS[1].text, DOCS[1].title)], embedder.encode([DOCS[1].text]))
    kb.close()
    reopened = KnowledgeBase(tmp_path, embedder)
    assert reopened.count() == 2
    assert reopened.search("capital of France", 1)[0].doc_id == "paris"


def test_ingest_cli_reads_the_generic_format_and_reports(tmp_path, capsys):
    from server.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) for d in DOCS) + "\n")
    assert main(["ingest", str(corpus), "--data-dir", str(tmp_path / "d")]) == 0
    assert "3 created" in capsys.readouterr().out
    assert main(["ingest", str(corpus), "--data-dir", str(tmp_path / "d")]) == 0
    assert "3 unchanged" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    assert main(["ingest", str(bad), "--data-dir", str(tmp_path / "d")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["ingest", str(corpus), "--data-dir", str(tmp_path / "d"), "--build", "nonsense"]) == 2


def test_ingest_cli_builds_kv_caches_with_the_engine_it_loads(tmp_path, capsys, monkeypatch):
    # --build loads the engine first (the embedder then runs on its thread), with the
    # settings' engine limits as the server would, and builds every document's artefact;
    # a second run finds them stored
    from server.cli import main
    from server.engine.torch_engine import TorchEngine
    from tests.tiny import tiny_model_folder

    limits = []
    shutdown = TorchEngine.shutdown
    monkeypatch.setattr(TorchEngine, "shutdown", lambda self: (limits.append(self.worker.limits), shutdown(self)))
    monkeypatch.setenv("KNOWMUX_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("KNOWMUX_PREFIX_CACHE_BLOCK", "4")

    model = tiny_model_folder(tmp_path / "tiny")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) for d in DOCS) + "\n")
    args = ["ingest", str(corpus), "--data-dir", str(tmp_path / "d"), "--model", str(model), "--build", "kv"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 created" in out and "kv: 3 built, 0 already stored" in out
    assert main(args) == 0
    assert "kv: 0 built, 3 already stored" in capsys.readouterr().out
    assert [(lim.max_batch_size, lim.prefix_cache_block) for lim in limits] == [(3, 4), (3, 4)]


def test_atomic_folder_replaces_whole_or_leaves_the_old_one(tmp_path):
    import pytest

    from indexes.atomic import atomic_folder

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target, prefix=".tmp-") as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_folder(target, prefix=".tmp-") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
