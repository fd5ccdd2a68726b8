from __future__ import annotations


async def test_query_flow(api, lomas_app):
    status, me = await api("whoami")
    assert status == 200 and me["username"] == "owner" and me["role"] == "admin"
    status, datasets = await api("datasets")
    assert status == 200 and [d["name"] for d in datasets] == ["penguins"]
    status, result = await api("query", "POST", {"dataset": "penguins", "epsilon": 1.0,
        "sql": "SELECT species, COUNT(*) AS n, AVG(bill_length_mm) AS mean_bill FROM penguins GROUP BY species"})
    assert status == 201, result
    print(result)
