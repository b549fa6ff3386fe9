# %postun of the session-manager-plugin rpm. $1 is the number of versions left installed:
# 0 on erase: remove our symlink, the log directory if empty, and the (then empty) install
# directories; >= 1 on upgrade: keep everything. A modified config file is kept by rpm as
# session-manager-plugin.conf.rpmsave, and then the install directory stays too.
INSTALL_DIR=/usr/local/sessionmanagerplugin
TARGET="$INSTALL_DIR/bin/session-manager-plugin"
LINK=/usr/local/bin/session-manager-plugin
if [ "$1" = 0 ]; then
    if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$TARGET" ]; then
        rm -f "$LINK"
    fi
    rmdir "$INSTALL_DIR/logs" "$INSTALL_DIR/bin" "$INSTALL_DIR" 2>/dev/null || true
fi
exit 0
