"""Builds ChatGPT-export-shaped conversations for the converter's tests (written for this project)."""

from __future__ import annotations

import itertools
import json
import zipfile
from pathlib import Path
from typing import List

_ids = itertools.count(1)


def message(role, text=None, *, content=None, recipient="all", hidden=False, weight=1.0, name=None,
            model=None, channel=None):
    meta = {}
    if hidden:
        meta["is_visually_hidden_from_conversation"] = True
    if model:
        meta["model_slug"] = model
    return {
        "id": f"m{next(_ids)}",
        "author": {"role": role, "name": name, "metadata": {}},
        "create_time": 1700000000.0,
        "content": content if content is not None else {"content_type": "text", "parts": [text]},
        "status": "finished_successfully",
        "weight": weight,
        "metadata": meta,
        "recipient": recipient,
        "channel": channel,
    }


class Tree:
    """A conversation tree: add nodes under parents; the last added node is current unless set."""

    def __init__(self, root_message=False):
        self.mapping = {}
        self.root = "client-created-root"
        self.mapping[self.root] = {"id": self.root, "message": None, "parent": None, "children": []}
        if not root_message:
            del self.mapping[self.root]["message"]  # some exports leave the key out
        self.current = self.root

    def add(self, msg, parent=None, key=None) -> str:
        parent = parent or self.current
        key = key or f"node-{next(_ids)}"  # a node's key is not its message's id
        self.mapping[key] = {"id": key, "message": msg, "parent": parent, "children": []}
        self.mapping[parent]["children"].append(key)
        self.current = key
        return key

    def chain(self, *pairs, parent=None) -> str:
        node = parent
        for role, text in pairs:
            node = self.add(message(role, text), parent=node)
        return node

    def conversation(self, cid, title="Chat", create_time=1700000000.0, update_time=None, current=None, **extra):
        conv = {
            "title": title,
            "create_time": create_time,
            "update_time": update_time if update_time is not None else create_time,
            "mapping": self.mapping,
            "current_node": current or self.current,
            "id": cid,
            "conversation_id": cid,
            "moderation_results": [],
        }
        conv.update(extra)
        return conv


def simple(cid, *pairs, **kwargs):
    tree = Tree()
    tree.add(message("system", "", hidden=True))
    tree.chain(*pairs)
    return tree.conversation(cid, **kwargs)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def write_zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data if isinstance(data, (str, bytes)) else json.dumps(data))
    return path


def read_records(path: Path) -> List[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def pairs(record: dict) -> List[tuple]:
    return [(m["role"], m["content"]) for m in record["messages"]]
