"""Regenerate the UI-format workflows (workflows/*.json) from the API-format ones here.

    python workflows/api/make_ui.py OBJECT_INFO.json     (a saved GET /object_info)

The API files are the source: tests run them. The UI files are what the template browser
opens; widget order and socket types come from the host's /object_info, so they match it.
tests/integration checks that both forms agree.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in WIDGET_TYPES or t == "COMBO"


def to_ui(api: dict, info: dict) -> dict:
    ids = sorted(api, key=int)
    depth = {}

    def level(nid):
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((level(u) for u in ups), default=-1)
        return depth[nid]

    for nid in ids:
        level(nid)
    nodes, links, rows = [], [], {}
    out_links = {}
    for nid in ids:
        for name, v in api[nid]["inputs"].items():
            if isinstance(v, list):
                lid = len(links) + 1
                src = info[api[v[0]]["class_type"]]["output"][v[1]]
                links.append([lid, int(v[0]), v[1], int(nid), name, src])
                out_links.setdefault((v[0], v[1]), []).append(lid)
    for order, nid in enumerate(sorted(ids, key=lambda n: (depth[n], int(n)))):
        node = api[nid]
        ct = node["class_type"]
        spec = info[ct]["input"]
        allspec = {**spec.get("required", {}), **spec.get("optional", {})}
        names = info[ct]["input_order"].get("required", []) + \
            info[ct]["input_order"].get("optional", [])
        inputs, widgets = [], []
        for name in names:
            v = node["inputs"].get(name)
            if isinstance(v, list):
                lid = next(l[0] for l in links if l[3] == int(nid) and l[4] == name)
                inputs.append({"name": name, "type": allspec[name][0], "link": lid})
            elif name in node["inputs"] and is_widget(allspec[name]):
                widgets.append(v)
                if len(allspec[name]) > 1 and allspec[name][1].get("control_after_generate"):
                    widgets.append("fixed")
        outputs = [{"name": info[ct]["output_name"][i], "type": t,
                    "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, t in enumerate(info[ct]["output"])]
        col = depth[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        nodes.append({"id": int(nid), "type": ct, "pos": [40 + 380 * col, 60 + 260 * row],
                      "size": [340, 130 + 26 * len(widgets)], "flags": {}, "order": order,
                      "mode": 0, "inputs": inputs, "outputs": outputs,
                      "title": node.get("_meta", {}).get("title", ct),
                      "properties": {"Node name for S&R": ct}, "widgets_values": widgets})
    for l in links:
        dst = next(n for n in nodes if n["id"] == l[3])
        l[4] = next(i for i, x in enumerate(dst["inputs"]) if x["link"] == l[0])
    return {"last_node_id": max(int(i) for i in ids), "last_link_id": len(links),
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def main(argv):
    info = json.loads(Path(argv[0]).read_text())
    for f in sorted(HERE.glob("*.json")):
        ui = to_ui(json.loads(f.read_text()), info)
        (HERE.parent / f.name).write_text(json.dumps(ui, indent=1) + "\n")
        print("wrote", HERE.parent / f.name)


if __name__ == "__main__":
    main(sys.argv[1:])
