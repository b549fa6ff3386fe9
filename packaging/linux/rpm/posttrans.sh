# %posttrans of the session-manager-plugin rpm (runs after install and after upgrade).
# Idempotent. It must be %posttrans, not %post: when upgrading from the official package, the
# official %postun runs after our %post and deletes /usr/local/bin/session-manager-plugin.
INSTALL_DIR=/usr/local/sessionmanagerplugin
TARGET="$INSTALL_DIR/bin/session-manager-plugin"
LINK=/usr/local/bin/session-manager-plugin
# Log directory, writable by root only (other users log to their own directory).
mkdir -p "$INSTALL_DIR/logs"
chmod 0755 "$INSTALL_DIR/logs"
mkdir -p /usr/local/bin
if [ -d "$LINK" ] && [ ! -L "$LINK" ]; then
    echo "session-manager-plugin: $LINK is a directory; add $INSTALL_DIR/bin to PATH instead." >&2
else
    ln -sfn "$TARGET" "$LINK"
fi
exit 0
