"""Send events to router from Python with router.client (standard library only)."""

from router.client import Client, ClientError

with Client("router-data/router.sock") as client:
    client.identify("u1", {"email": "ada@example.com", "plan": "pro"})
    for i in range(1000):  # pipelined: no waiting for each ack
        client.track("u1", "Item Viewed", {"item": i})
    client.flush()  # returns once all 1001 are committed

    client.send({"type": "track", "userId": "u1"})  # no "event": the daemon refuses it
    try:
        client.flush()
    except ClientError as error:
        print(f"refused: {error.code}: {error.message}")

    stats = client.statistics()
    print(f"sent {stats.sent}, acked {stats.acked}, refused {stats.refused}")
