#!/bin/sh
# If you keep keepalived for a floating IP, let it follow hasync instead of its own election:
#   vrrp_script hasync_primary { script "/etc/hasync/keepalived-check.sh" interval 1 fall 1 rise 1 }
#   vrrp_instance VI_1 { ... track_script { hasync_primary } }
# /role answers 200 only on the primary (and only while its lease is valid).
exec curl -fsS -o /dev/null --max-time 1 http://127.0.0.1:8765/role
