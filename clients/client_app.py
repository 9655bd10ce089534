"""Site ClientApp, started by the hospital's SuperNode for each instruction.

The SuperNode's node config says where the site's data is:
``--node-config "data-dir='/srv/site-a' site-name='site-a'"`` (``dataset.json`` inside).
Only model parameters and aggregate metrics are sent back.
"""

from fedhealth.federation.apps import make_client_app

app = make_client_app()
