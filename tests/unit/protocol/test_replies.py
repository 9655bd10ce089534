"""An error reply names the site as the site names itself, even before its config is read."""

from __future__ import annotations

from fedhealth.protocol import keys as K
from fedhealth.protocol.replies import node_site_name


def test_a_simulated_site_is_named_after_its_folder_as_it_names_itself():
    folders = ("/data/hosp-a", "/data/hosp-b")
    assert node_site_name({K.NODE_PARTITION_ID: 1}, folders) == "hosp-b"
    assert node_site_name({K.NODE_PARTITION_ID: 1}) == "site-1"  # synthetic sites: site-<i>
    assert node_site_name({K.NODE_PARTITION_ID: 7}, folders) == "site-7"  # no such folder
    assert node_site_name({K.NODE_SITE_NAME: "st-olav", K.NODE_PARTITION_ID: 0}, folders) == (
        "st-olav"
    )
    assert node_site_name({}) == "unknown"
