# Makes keap-sync@.service from keap-sync.service: one instance per config file, each with its
# own sandbox user, environment file and credentials. `.ci/check-systemd` checks that the
# committed keap-sync@.service is exactly this script's output:
#   sed -f systemd/template.sed systemd/keap-sync.service > systemd/keap-sync@.service
1,/^$/c\
# keap-sync@.service: keap-sync, one instance per config file (made from keap-sync.service by\
# systemd/template.sed; edit that file and the script, not this one).\
#\
# `systemctl enable --now keap-sync@shop` runs `keap-sync --config /etc/keap-sync/shop.toml run`\
# with /etc/keap-sync/shop.env and the credential /etc/keap-sync/shop.client-secret (or\
# shop.api-key), as its own transient user keap-sync-shop. Each instance keeps its state in the\
# database its config names: give each its own database or Keap account. Everything else is\
# keap-sync.service's; its comments below hold for each instance.\

s|^Description=keap-sync: |Description=keap-sync (%i): |
s|--config /etc/keap-sync/keap-sync.toml run|--config /etc/keap-sync/%i.toml run|
s|^# A transient system user (named keap-sync), |# A transient system user (named keap-sync-%i), |
s|^DynamicUser=yes$|DynamicUser=yes\nUser=keap-sync-%i|
s|^EnvironmentFile=-/etc/keap-sync/env$|EnvironmentFile=-/etc/keap-sync/%i.env|
s|^LoadCredential=keap-client-secret:/etc/keap-sync/client-secret$|LoadCredential=keap-client-secret:/etc/keap-sync/%i.client-secret|
s|^#LoadCredential=keap-api-key:/etc/keap-sync/api-key$|#LoadCredential=keap-api-key:/etc/keap-sync/%i.api-key|
