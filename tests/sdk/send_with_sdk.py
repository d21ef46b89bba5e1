"""Drives one real analytics SDK through every call type against breakwater.

The SDK is configured with breakwater's URL and a write key and nothing else, so it
runs exactly as a producer's code would. The folder of the installed SDK release is
on PYTHONPATH (scripts/test.sh installs each release into target/sdks/<name>).

Prints one JSON line per event it asked the SDK to send (what the test then looks
for in ClickHouse and Kafka), then a last line {"errors": [...]} with every error the
SDK reported through on_error after its own retries.
"""

import argparse
import copy
import datetime
import json
import secrets
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--sdk", required=True, choices=["segment", "rudder"])
parser.add_argument("--host", required=True)
parser.add_argument("--write-key", required=True)
parser.add_argument("--prefix", required=True, help="messageId prefix, unique per run")
parser.add_argument("--rounds", type=int, default=10, help="each round sends all six call types")
parser.add_argument("--padding-bytes", type=int, default=0,
                    help="random hex added to each track event's properties (incompressible bytes)")
args = parser.parse_args()

if args.sdk == "segment":
    from segment.analytics import Client
else:
    from rudderstack.analytics import Client

errors = []


def on_error(error, batch):
    errors.append(
        {
            "error": str(error),
            "status": getattr(error, "status", None),
            "code": getattr(error, "code", None),
            "events": len(batch),
            "at": time.time(),
        }
    )


client = Client(write_key=args.write_key, host=args.host, on_error=on_error)

# A fixed time in the past: the test checks breakwater corrected it for clock skew
# (timestamp = receivedAt - (sentAt - originalTimestamp)).
when = datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.timezone.utc)
sent = []


def expect(kind, message_id, **fields):
    sent.append({"type": kind, "messageId": message_id, "timestamp": when.isoformat(), **fields})


def own(value):
    # The SDKs write into the dicts they are given (context.library, and rudder's
    # context.traits): each call gets its own copy; the expectation keeps the original.
    return copy.deepcopy(value)


for r in range(args.rounds):
    p = f"{args.prefix}-{r}"
    user = f"{args.prefix}-user-{r % 7}"
    anonymous = f"{args.prefix}-anon-{r}"
    context = {"app": {"name": "sdk-compat", "build": str(r)}, "locale": "fr-CH"}

    properties = {"revenue": 12.5 + r, "currency": "CHF", "items": [{"sku": "a-1", "qty": 2}], "note": "Zoë \"Q\""}
    if args.padding_bytes:
        properties["padding"] = secrets.token_hex(args.padding_bytes)[: args.padding_bytes]
    client.track(user_id=user, event="Order Completed", properties=own(properties), context=own(context),
                 timestamp=when, message_id=f"{p}-track")
    expect("track", f"{p}-track", userId=user, event="Order Completed", properties=properties, context=context)

    traits = {"email": f"{user}@example.com", "plan": "pro", "seats": r}
    client.identify(user_id=user, traits=own(traits), context=own(context), timestamp=when, message_id=f"{p}-identify")
    expect("identify", f"{p}-identify", userId=user, traits=traits, context=context)

    page_properties = {"path": "/pricing", "referrer": "https://example.com/"}
    client.page(anonymous_id=anonymous, category="Docs", name="Pricing", properties=own(page_properties),
                context=own(context), timestamp=when, message_id=f"{p}-page")
    expect("page", f"{p}-page", anonymousId=anonymous, name="Pricing", category="Docs",
           properties=page_properties, context=context)

    client.screen(user_id=user, category="App", name="Home", properties={"tab": r}, context=own(context),
                  timestamp=when, message_id=f"{p}-screen")
    expect("screen", f"{p}-screen", userId=user, name="Home", category="App", properties={"tab": r},
           context=context)

    group_traits = {"name": "Acme", "employees": 120 + r}
    client.group(user_id=user, group_id=f"{p}-group", traits=own(group_traits), context=own(context), timestamp=when,
                 message_id=f"{p}-group")
    expect("group", f"{p}-group", userId=user, groupId=f"{p}-group", traits=group_traits, context=context)

    client.alias(previous_id=anonymous, user_id=user, context=own(context), timestamp=when, message_id=f"{p}-alias")
    expect("alias", f"{p}-alias", userId=user, previousId=anonymous, context=context)

started = time.time()
client.flush()  # returns once the SDK's queue is empty: sent, or given up after retries
for event in sent:
    print(json.dumps(event))
print(json.dumps({"errors": errors, "flush_seconds": round(time.time() - started, 3)}))
sys.stdout.flush()
