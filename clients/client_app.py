"""Site ClientApp, started by the hospital's SuperNode for each instruction.

The SuperNode's node config says where the site's data is:
``--node-config "data-dir='/srv/site-a' site-name='site-a'"`` (``dataset.json`` inside).
Only model parameters and aggregate metrics are sent back; with ``egress-log='/path'`` in the node
config, every reply is also logged there (size and sha256) for the hospital's own audit.
"""

from fedhealth.clientapp.app import make_client_app
from fedhealth.clientapp.egress import EgressLog

app = make_client_app(mods=[EgressLog()])
