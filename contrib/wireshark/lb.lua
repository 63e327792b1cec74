-- lb.lua: Wireshark dissectors for lb, the clustered connection-handoff load balancer.
--
--   lbctl    the cluster control protocol (docs/protocol.md), versions 1 and 2, on TCP port
--            7400 (cluster.port's default; preference lbctl.tcp_ports, and Decode As).
--   lbchain  the chain protocol between a downstream and an upstream proxy (docs/codec.md,
--            section 11): the HELLO, the MODE byte and the records. Found by its "LBCH" magic
--            (heuristic on TCP), or by Decode As.
--
-- Load it with `wireshark -X lua_script:contrib/wireshark/lb.lua` (or tshark), or copy it into
-- the personal Lua plugins folder (Help > About Wireshark > Folders). Tested with Wireshark
-- 4.0 (tests/wireshark.rs). Only plaintext channels can be read: with a [tls] section the
-- control protocol runs inside TLS and shows up as TLS application data.
--
-- Sources of truth: cluster-proto/src/wire.rs and lb/src/chain/wire.rs. A frame whose bytes
-- lb would refuse is marked with expert info (Analyze > Expert Information), never dropped.

local DEFAULT_PORTS = "7400"

----------------------------------------------------------------------------------------------
-- Shared helpers
----------------------------------------------------------------------------------------------

-- A key for the TCP connection of this packet, and one for its direction. (Not tcp.stream: a
-- field extractor gets nothing on a first pass that builds no tree, such as tshark -2's.)
local function stream_keys(pinfo)
    local a = tostring(pinfo.src) .. "/" .. tostring(pinfo.src_port)
    local b = tostring(pinfo.dst) .. "/" .. tostring(pinfo.dst_port)
    if a < b then
        return a .. "|" .. b, a
    end
    return b .. "|" .. a, a
end

-- True when an address of `nbytes` bytes at `range` has no bit set beyond its first `plen`.
local function host_bits_zero(range, nbytes, plen)
    for i = 0, nbytes - 1 do
        local byte = range(i, 1):uint()
        local kept = plen - 8 * i
        if kept <= 0 then
            if byte ~= 0 then
                return false
            end
        elseif kept < 8 then
            local unit = 2 ^ (8 - kept)
            if byte % unit ~= 0 then
                return false
            end
        end
    end
    return true
end

-- A binary32 value lb accepts: finite and not negative (NaN fails both comparisons).
local function good_float(v)
    return v >= 0 and v < math.huge
end

-- Asks TCP for `more` bytes beyond the end of `tvb` (nil: the next segment, when the length
-- of the PDU is not known yet), starting the next PDU at `offset`. Returns false when this
-- frame cannot be desegmented (reassembly off, or not over TCP).
local function desegment(pinfo, offset, more)
    if pinfo.can_desegment > 0 then
        pinfo.desegment_offset = offset
        pinfo.desegment_len = more or DESEGMENT_ONE_MORE_SEGMENT
        return true
    end
    return false
end

-- The Info column: TCP may call a dissector more than once for a frame (a reassembled PDU,
-- then the rest of the segment) and fences the column between the calls, so the summaries of
-- one frame are joined here with ", ".
local info_texts = {}

local function set_info(pinfo, text)
    local col = pinfo.cols.info
    local current = tostring(col)
    local previous = info_texts[pinfo.number]
    if previous and #current >= #previous and current:sub(-#previous) == previous then
        col:append(", " .. text)
        info_texts[pinfo.number] = previous .. ", " .. text
    else
        col:set(text)
        info_texts[pinfo.number] = text
    end
end

-- Where `offset` of `tvb` lies in the frame, to order the messages of one frame and to tell
-- apart the calls TCP makes for it: a reassembled PDU (a tvb of its own, raw offset 0) comes
-- before the rest of the segment (a part of the frame, past the TCP header).
local function position(tvb, offset)
    return tvb:offset() * 16777216 + offset
end

-- State kept across frames (channel versions, chain phases) is built on the first pass over
-- the capture and read on later ones. The init routines run whenever dissection starts over,
-- also over frames already seen (which then are "visited" and read the state without
-- rebuilding it), so the state is dropped only when the frames are new again: a new file, or
-- a full redissection.
local pending = {}

local function fresh_pass(name, pinfo)
    if pending[name] then
        pending[name] = false
        return not pinfo.visited
    end
    return false
end

----------------------------------------------------------------------------------------------
-- lbctl: the cluster control protocol
----------------------------------------------------------------------------------------------

local lbctl = Proto("lbctl", "lb Cluster Control Protocol")

local MSG_INSTALL, MSG_REMOVE, MSG_SYNC, MSG_DICT_STATS, MSG_LOAD = 1, 2, 3, 4, 5
local PEER_JOIN, PEER_KEEPALIVE, PEER_LEAVE, PEER_REJECT = 1, 2, 3, 4

local message_types = {
    [1] = "INSTALL_CONNECTION",
    [2] = "REMOVE_CONNECTION",
    [3] = "CLUSTER_PEER_SYNC",
    [4] = "DICT_STATS",
    [5] = "LOAD",
}
local connection_actions = { [1] = "FORWARD", [2] = "BYPASS" }
local sync_actions = { [1] = "PEER_JOIN", [2] = "PEER_KEEPALIVE", [3] = "PEER_LEAVE", [4] = "PEER_REJECT" }
local advertise_actions = { [1] = "ADVERTISE" }
local protocols = { [6] = "TCP", [17] = "UDP" }
local families = { [1] = "IPv4", [2] = "IPv6" }
local error_codes = {
    [0] = "none",
    [1] = "not_a_member",
    [2] = "version_mismatch",
    [3] = "bad_message",
    [4] = "duplicate_channel",
    [5] = "stalled",
    [6] = "join_timeout",
    [7] = "restarting",
}
local versions = { [1] = "version 1 (the paper's format)", [2] = "version 2 (DICT_STATS, LOAD)" }

local pf = {
    type = ProtoField.uint8("lbctl.type", "Message Type", base.DEC, message_types),
    action = ProtoField.uint8("lbctl.action", "Action Type", base.DEC, connection_actions),
    sync = ProtoField.uint8("lbctl.sync", "Peer Sync Action", base.DEC, sync_actions),
    adv_action = ProtoField.uint8("lbctl.adv_action", "Advertisement Action", base.DEC, advertise_actions),
    protocol = ProtoField.uint8("lbctl.protocol", "Protocol", base.DEC, protocols),
    family = ProtoField.uint8("lbctl.family", "Address Family", base.DEC, families),
    version = ProtoField.uint8("lbctl.version", "Version", base.DEC, versions),
    error = ProtoField.uint8("lbctl.error", "Error Code", base.DEC, error_codes),
    reserved = ProtoField.bytes("lbctl.reserved", "Reserved"),
    restart_time = ProtoField.uint8("lbctl.restart_time", "Restart Time (s)", base.DEC),
    srcport = ProtoField.uint16("lbctl.srcport", "Source Port", base.DEC),
    dstport = ProtoField.uint16("lbctl.dstport", "Destination Port", base.DEC),
    src = ProtoField.ipv4("lbctl.src", "Source Address"),
    dst = ProtoField.ipv4("lbctl.dst", "Destination Address"),
    src6 = ProtoField.ipv6("lbctl.src6", "Source Address"),
    dst6 = ProtoField.ipv6("lbctl.dst6", "Destination Address"),
    member = ProtoField.uint8("lbctl.member", "Member", base.DEC),
    epoch = ProtoField.uint32("lbctl.epoch", "Dictionary Epoch", base.DEC),
    client_plen = ProtoField.uint8("lbctl.client_prefix_len", "Client Prefix Length", base.DEC),
    server_plen = ProtoField.uint8("lbctl.server_prefix_len", "Server Prefix Length", base.DEC),
    count = ProtoField.uint16("lbctl.record_count", "Record Count", base.DEC),
    record = ProtoField.none("lbctl.record", "Record"),
    rec_client = ProtoField.ipv4("lbctl.record.client", "Client Prefix"),
    rec_client6 = ProtoField.ipv6("lbctl.record.client6", "Client Prefix"),
    rec_server = ProtoField.ipv4("lbctl.record.server", "Server Address"),
    rec_server6 = ProtoField.ipv6("lbctl.record.server6", "Server Address"),
    rec_saved = ProtoField.float("lbctl.record.saved", "Decayed Bytes Saved"),
    load = ProtoField.float("lbctl.load", "Load"),
    length = ProtoField.uint32("lbctl.length", "Message Length", base.DEC),
    channel_version = ProtoField.uint8("lbctl.channel_version", "Channel Version", base.DEC),
    undecoded = ProtoField.bytes("lbctl.undecoded", "Undecodable Bytes"),
}
lbctl.fields = {
    pf.type, pf.action, pf.sync, pf.adv_action, pf.protocol, pf.family, pf.version, pf.error, pf.restart_time,
    pf.reserved, pf.srcport, pf.dstport, pf.src, pf.dst, pf.src6, pf.dst6, pf.member, pf.epoch,
    pf.client_plen, pf.server_plen, pf.count, pf.record, pf.rec_client, pf.rec_client6,
    pf.rec_server, pf.rec_server6, pf.rec_saved, pf.load, pf.length, pf.channel_version,
    pf.undecoded,
}

local ex = {
    malformed = ProtoExpert.new("lbctl.malformed", "Bytes lb cannot decode: the stream cannot be parsed on",
        expert.group.MALFORMED, expert.severity.ERROR),
    incomplete = ProtoExpert.new("lbctl.incomplete", "Message continues beyond this frame",
        expert.group.REASSEMBLE, expert.severity.WARN),
    v2_on_v1 = ProtoExpert.new("lbctl.v2_on_v1",
        "Version-2 message on a version-1 channel (lb answers PEER_LEAVE bad_message)",
        expert.group.PROTOCOL, expert.severity.WARN),
    bad_version = ProtoExpert.new("lbctl.bad_version", "PEER_JOIN version lb does not speak",
        expert.group.PROTOCOL, expert.severity.WARN),
    unknown_code = ProtoExpert.new("lbctl.unknown_error", "Unknown error code (logged as unknown)",
        expert.group.PROTOCOL, expert.severity.NOTE),
    bad_content = ProtoExpert.new("lbctl.bad_content",
        "Advertisement content lb drops (prefix length, host bits or value)",
        expert.group.PROTOCOL, expert.severity.WARN),
    refusal = ProtoExpert.new("lbctl.refusal", "Channel refused or closed with an error",
        expert.group.SEQUENCE, expert.severity.NOTE),
}
lbctl.experts = { ex.malformed, ex.incomplete, ex.v2_on_v1, ex.bad_version, ex.unknown_code, ex.bad_content,
    ex.refusal }

lbctl.prefs.tcp_ports = Pref.range("Control ports", DEFAULT_PORTS,
    "TCP ports of the control channel (cluster.port, 7400 by default, and any per-member port)", 65535)

-- Per TCP connection: the PEER_JOINs seen, in frame order, for the channel version.
local joins = {}
-- TCP connections whose first bytes were a TLS record: a [tls] channel.
local tls_channels = {}
local tls = Dissector.get("tls")

-- A TLS record header (ChangeCipherSpec, Alert, Handshake or ApplicationData, version 3.x):
-- no lb message type is 20-23, so this never hides a control message.
local function tls_record(tvb)
    if tvb:len() < 2 then
        return false
    end
    local t = tvb(0, 1):uint()
    return t >= 20 and t <= 23 and tvb(1, 1):uint() == 3
end

function lbctl.init()
    pending.lbctl = true
end

local function note_join(pinfo, conv, dir, pos, version)
    if pinfo.visited then
        return
    end
    local list = joins[conv]
    if not list then
        list = {}
        joins[conv] = list
    end
    list[#list + 1] = { frame = pinfo.number, pos = pos, dir = dir, version = version }
end

-- The version the channel runs at before (frame, pos): the answer to the latest PEER_JOIN
-- offer (a PEER_JOIN from one end, answered by one from the other end).
local function channel_version(conv, frame, pos)
    local offer, version
    for _, j in ipairs(joins[conv] or {}) do
        if j.frame > frame or (j.frame == frame and j.pos >= pos) then
            break
        end
        if offer and not version and j.dir ~= offer.dir then
            version = j.version
        else
            offer, version = j, nil
        end
    end
    return version
end

-- The length of the message at `offset` (known from its first bytes, never more than 12):
--   n            the message is n bytes long;
--   nil, need    the first `need` bytes are needed to tell;
--   false, why   lb refuses these bytes (`why` is the decode error).
local function message_length(tvb, offset)
    local avail = tvb:len() - offset
    local t = tvb(offset, 1):uint()
    if not message_types[t] then
        return false, string.format("unknown message type %d", t)
    end
    if avail < 2 then
        return nil, 2
    end
    local a = tvb(offset + 1, 1):uint()
    if t == MSG_INSTALL or t == MSG_REMOVE then
        if not connection_actions[a] then
            return false, string.format("unknown action %d for message type %d", a, t)
        end
        if avail < 4 then
            return nil, 4
        end
        local p, af = tvb(offset + 2, 1):uint(), tvb(offset + 3, 1):uint()
        if not protocols[p] then
            return false, string.format("unknown protocol %d", p)
        end
        if af == 1 then
            return 16
        elseif af == 2 then
            return 40
        end
        return false, string.format("unknown address family %d", af)
    elseif t == MSG_SYNC then
        if not sync_actions[a] then
            return false, string.format("unknown action %d for message type %d", a, t)
        end
        return 4
    end
    -- DICT_STATS and LOAD (version 2)
    if a ~= 1 then
        return false, string.format("unknown action %d for message type %d", a, t)
    end
    if t == MSG_LOAD then
        return 8
    end
    if avail < 4 then
        return nil, 4
    end
    local af = tvb(offset + 3, 1):uint()
    if af ~= 1 and af ~= 2 then
        return false, string.format("unknown address family %d", af)
    end
    if avail < 12 then
        return nil, 12
    end
    local count = tvb(offset + 10, 2):uint()
    if count > 4096 then
        return false, string.format("%d records in one DICT_STATS (at most 4096)", count)
    end
    return 12 + count * (af == 1 and 12 or 36)
end

local function endpoint(addr, port, v6)
    if v6 then
        return "[" .. addr .. "]:" .. port
    end
    return addr .. ":" .. port
end

-- The header fields present in `range` (at most 4 bytes), for a message that is malformed or cut.
local function add_header(t, range)
    local n = range:len()
    local mt = range(0, 1):uint()
    t:add(pf.type, range(0, 1))
    if n >= 2 then
        if mt == MSG_INSTALL or mt == MSG_REMOVE then
            t:add(pf.action, range(1, 1))
        elseif mt == MSG_SYNC then
            t:add(pf.sync, range(1, 1))
        elseif mt == MSG_DICT_STATS or mt == MSG_LOAD then
            t:add(pf.adv_action, range(1, 1))
        end
    end
    if n >= 4 and (mt == MSG_INSTALL or mt == MSG_REMOVE) then
        t:add(pf.protocol, range(2, 1))
        t:add(pf.family, range(3, 1))
    end
end

-- Dissects one whole message of `len` bytes at `offset`; returns a one-line summary.
local function dissect_message(tvb, pinfo, tree, offset, len, conv, dir)
    local r = tvb(offset, len)
    local pos = position(tvb, offset)
    local t = tree:add(lbctl, r)
    local mt, a = r(0, 1):uint(), r(1, 1):uint()
    t:add(pf.type, r(0, 1))
    t:add(pf.length, len):set_generated()
    local cv = channel_version(conv, pinfo.number, pos)
    if cv then
        t:add(pf.channel_version, cv):set_generated()
    end
    local summary
    if mt == MSG_INSTALL or mt == MSG_REMOVE then
        local v6 = len == 40
        t:add(pf.action, r(1, 1))
        t:add(pf.protocol, r(2, 1))
        t:add(pf.family, r(3, 1))
        t:add(pf.srcport, r(4, 2))
        t:add(pf.dstport, r(6, 2))
        local src, dst
        if v6 then
            t:add(pf.src6, r(8, 16))
            t:add(pf.dst6, r(24, 16))
            src, dst = tostring(r(8, 16):ipv6()), tostring(r(24, 16):ipv6())
        else
            t:add(pf.src, r(8, 4))
            t:add(pf.dst, r(12, 4))
            src, dst = tostring(r(8, 4):ipv4()), tostring(r(12, 4):ipv4())
        end
        summary = string.format("%s %s %s %s -> %s", message_types[mt], connection_actions[a], protocols[r(2, 1):uint()],
            endpoint(src, r(4, 2):uint(), v6), endpoint(dst, r(6, 2):uint(), v6))
    elseif mt == MSG_SYNC then
        t:add(pf.sync, r(1, 1))
        local b2 = r(2, 1):uint()
        if a == PEER_JOIN then
            t:add(pf.version, r(2, 1))
            if b2 >= 2 then
                -- Version 2: the sender's graceful-restart time (0: none).
                t:add(pf.restart_time, r(3, 1))
            else
                t:add(pf.reserved, r(3, 1))
            end
            note_join(pinfo, conv, dir, pos, b2)
            summary = string.format("PEER_JOIN version %d", b2)
            if b2 >= 2 and r(3, 1):uint() > 0 then
                summary = summary .. string.format(", restart time %d s", r(3, 1):uint())
            end
            if b2 ~= 1 and b2 ~= 2 then
                t:add_proto_expert_info(ex.bad_version, string.format("PEER_JOIN version %d: lb speaks 1 and 2", b2))
            end
        elseif a == PEER_KEEPALIVE then
            t:add(pf.reserved, r(2, 2))
            summary = "PEER_KEEPALIVE"
        else
            t:add(pf.error, r(2, 1))
            t:add(pf.reserved, r(3, 1))
            local name = error_codes[b2] or "unknown"
            summary = string.format("%s %s (%d)", sync_actions[a], name, b2)
            if not error_codes[b2] then
                t:add_proto_expert_info(ex.unknown_code)
            elseif b2 ~= 0 and b2 ~= 7 then
                t:add_proto_expert_info(ex.refusal, string.format("%s: %s", sync_actions[a], name))
            end
        end
    elseif mt == MSG_LOAD then
        t:add(pf.adv_action, r(1, 1))
        t:add(pf.member, r(2, 1))
        t:add(pf.reserved, r(3, 1))
        local load = r(4, 4):float()
        local li = t:add(pf.load, r(4, 4))
        if not good_float(load) then
            li:add_proto_expert_info(ex.bad_content, "Load must be finite and not negative")
        end
        summary = string.format("LOAD member %d load %g", r(2, 1):uint(), load)
    else -- DICT_STATS
        local af = r(3, 1):uint()
        local v6 = af == 2
        local alen, limit = 4, 32
        if v6 then
            alen, limit = 16, 128
        end
        t:add(pf.adv_action, r(1, 1))
        t:add(pf.member, r(2, 1))
        t:add(pf.family, r(3, 1))
        t:add(pf.epoch, r(4, 4))
        local cl, sl = r(8, 1):uint(), r(9, 1):uint()
        local cli = t:add(pf.client_plen, r(8, 1))
        local sli = t:add(pf.server_plen, r(9, 1))
        local count = r(10, 2):uint()
        t:add(pf.count, r(10, 2))
        local bad_plen = cl > limit or sl > limit
        if cl > limit then
            cli:add_proto_expert_info(ex.bad_content, string.format("Prefix length above %d", limit))
        end
        if sl > limit then
            sli:add_proto_expert_info(ex.bad_content, string.format("Prefix length above %d", limit))
        end
        local rlen = 2 * alen + 4
        for i = 0, count - 1 do
            local rr = r(12 + i * rlen, rlen)
            local client, server
            if v6 then
                client, server = tostring(rr(0, 16):ipv6()), tostring(rr(16, 16):ipv6())
            else
                client, server = tostring(rr(0, 4):ipv4()), tostring(rr(4, 4):ipv4())
            end
            local saved = rr(2 * alen, 4):float()
            local rt = t:add(pf.record, rr)
            rt:set_text(string.format("Record %d: %s/%d -> %s/%d saved %g", i + 1, client, cl, server, sl, saved))
            rt:add(v6 and pf.rec_client6 or pf.rec_client, rr(0, alen))
            rt:add(v6 and pf.rec_server6 or pf.rec_server, rr(alen, alen))
            local si = rt:add(pf.rec_saved, rr(2 * alen, 4))
            if not bad_plen and not (host_bits_zero(rr(0, alen), alen, cl) and host_bits_zero(rr(alen, alen), alen, sl)) then
                rt:add_proto_expert_info(ex.bad_content, "Host bits set beyond the prefix length")
            end
            if not good_float(saved) then
                si:add_proto_expert_info(ex.bad_content, "Saving must be finite and not negative")
            end
        end
        summary = string.format("DICT_STATS member %d %s epoch %d /%d /%d, %d record%s", r(2, 1):uint(), families[af],
            r(4, 4):uint(), cl, sl, count, count == 1 and "" or "s")
    end
    if (mt == MSG_DICT_STATS or mt == MSG_LOAD) and cv == 1 then
        t:add_proto_expert_info(ex.v2_on_v1)
    end
    t:append_text(": " .. summary)
    return summary
end

function lbctl.dissector(tvb, pinfo, tree)
    local total = tvb:len()
    if total == 0 then
        return 0
    end
    pinfo.cols.protocol = "LBCTL"
    if fresh_pass("lbctl", pinfo) then
        joins = {}
        tls_channels = {}
        info_texts = {}
    end
    local conv, dir = stream_keys(pinfo)
    -- A [tls] channel: TLS from its first byte (protocol.md, Transport security). Without the
    -- session keys only the handshake can be read, so it is left to the TLS dissector.
    if tls_channels[conv] or (not joins[conv] and tls_record(tvb)) then
        if not pinfo.visited then
            tls_channels[conv] = true
        end
        return tls:call(tvb, pinfo, tree)
    end
    local summaries = {}
    local offset = 0
    while offset < total do
        local len, info = message_length(tvb, offset)
        if len == false then
            local t = tree:add(lbctl, tvb(offset))
            add_header(t, tvb(offset, math.min(4, total - offset)))
            t:add(pf.undecoded, tvb(offset))
            t:add_proto_expert_info(ex.malformed, "Malformed: " .. info)
            t:append_text(": [Malformed: " .. info .. "]")
            summaries[#summaries + 1] = "[Malformed: " .. info .. "]"
            break
        end
        local need = len or info
        if need > total - offset then
            if desegment(pinfo, offset, len and need - (total - offset)) then
                break
            end
            local t = tree:add(lbctl, tvb(offset))
            add_header(t, tvb(offset, math.min(4, total - offset)))
            t:add_proto_expert_info(ex.incomplete)
            t:append_text(": [incomplete]")
            summaries[#summaries + 1] = "[incomplete " .. message_types[tvb(offset, 1):uint()] .. "]"
            break
        end
        if len then
            summaries[#summaries + 1] = dissect_message(tvb, pinfo, tree, offset, len, conv, dir)
            offset = offset + len
        end
        -- (len == nil with need <= available cannot happen: message_length asks only for
        -- bytes beyond those present.)
    end
    if #summaries > 0 then
        set_info(pinfo, table.concat(summaries, ", "))
    end
    return total
end

local tcp_port_table = DissectorTable.get("tcp.port")
local registered_ports = DEFAULT_PORTS
tcp_port_table:add(DEFAULT_PORTS, lbctl)

function lbctl.prefs_changed()
    local ports = lbctl.prefs.tcp_ports
    if ports ~= registered_ports then
        tcp_port_table:remove_all(lbctl)
        if ports ~= "" then
            tcp_port_table:add(ports, lbctl)
        end
        registered_ports = ports
    end
end

----------------------------------------------------------------------------------------------
-- lbchain: the chain protocol (HELLO, MODE, records)
----------------------------------------------------------------------------------------------

local lbchain = Proto("lbchain", "lb Proxy Chain Protocol")

local HELLO_FIXED = 15
local MAX_RECORD = 1048576
local modes = { [0] = "EPHEMERAL", [1] = "PERSISTENT", [2] = "RAW", [3] = "SHARED" }
local record_types = { [1] = "DATA", [2] = "END", [3] = "DONE" }
local senders = { [1] = "downstream", [2] = "upstream" }

local cf = {
    magic = ProtoField.string("lbchain.magic", "Magic"),
    version = ProtoField.uint8("lbchain.version", "Version", base.DEC),
    flags = ProtoField.uint8("lbchain.flags", "Flags", base.HEX),
    available = ProtoField.bool("lbchain.flags.available", "AVAILABLE", 8, nil, 0x01,
        "the upstream checked the pair's dictionaries out for this connection"),
    shared = ProtoField.bool("lbchain.flags.shared", "SHARED", 8, nil, 0x02,
        "the sender runs the pair's dictionaries shared by all of its connections"),
    unknown_flags = ProtoField.uint8("lbchain.flags.unknown", "Unknown flags (ignored)", base.HEX, nil, 0x0c),
    codec = ProtoField.uint8("lbchain.flags.codec", "Codec Version Decoded", base.DEC, nil, 0xf0,
        "highest codec framing version the sender decodes; 0 (builds before it was announced) reads as 1"),
    id_len = ProtoField.uint8("lbchain.id_len", "Identity Length", base.DEC),
    budget = ProtoField.uint64("lbchain.budget", "Dictionary Budget", base.DEC),
    id = ProtoField.string("lbchain.id", "Identity", base.UNICODE),
    sender = ProtoField.uint8("lbchain.sender", "Sender", base.DEC, senders),
    mode = ProtoField.uint8("lbchain.mode", "Mode", base.DEC, modes),
    record_type = ProtoField.uint8("lbchain.record.type", "Record Type", base.DEC, record_types),
    record_len = ProtoField.uint32("lbchain.record.len", "Record Length", base.DEC),
    record_data = ProtoField.bytes("lbchain.record.data", "Codec Bytes"),
    raw = ProtoField.bytes("lbchain.raw", "Relayed Bytes"),
    undecoded = ProtoField.bytes("lbchain.undecoded", "Undecodable Bytes"),
}
lbchain.fields = {
    cf.magic, cf.version, cf.flags, cf.available, cf.shared, cf.unknown_flags, cf.codec, cf.id_len, cf.budget, cf.id, cf.sender,
    cf.mode, cf.record_type, cf.record_len, cf.record_data, cf.raw, cf.undecoded,
}

local cx = {
    bad_hello = ProtoExpert.new("lbchain.bad_hello", "HELLO lb refuses (the connection is relayed plain or fails)",
        expert.group.MALFORMED, expert.severity.ERROR),
    malformed = ProtoExpert.new("lbchain.malformed", "Bytes lb cannot decode: both sockets are reset",
        expert.group.MALFORMED, expert.severity.ERROR),
    no_hello = ProtoExpert.new("lbchain.no_hello", "No HELLO from this side: no upstream on the path",
        expert.group.SEQUENCE, expert.severity.WARN),
    incomplete = ProtoExpert.new("lbchain.incomplete", "Record continues beyond this frame",
        expert.group.REASSEMBLE, expert.severity.WARN),
}
lbchain.experts = { cx.bad_hello, cx.malformed, cx.no_hello, cx.incomplete }

-- Per TCP connection: which direction is the downstream's, the MODE and its frame, and per
-- direction the parse phase ("hello", "mode", "records", "raw", "broken"). The phase at the
-- start of each frame is remembered on the first pass, so a second pass or a click in the GUI
-- dissects the frame the same way.
local chains = {}
local frame_phase = {}

function lbchain.init()
    pending.lbchain = true
end

-- Dissects a HELLO at `offset`: returns its length and summary; nil and its length, or nil
-- alone, while incomplete; false, the summary and its length when lb refuses it.
local function dissect_hello(tvb, pinfo, tree, offset, sender)
    local avail = tvb:len() - offset
    if avail < 7 then
        return nil, nil
    end
    local idlen = tvb(offset + 6, 1):uint()
    local len = HELLO_FIXED + idlen
    if avail < len then
        return nil, len
    end
    local r = tvb(offset, len)
    local t = tree:add(lbchain, r)
    t:add(cf.magic, r(0, 4))
    t:add(cf.sender, sender):set_generated()
    local vi = t:add(cf.version, r(4, 1))
    local fi = t:add(cf.flags, r(5, 1))
    fi:add(cf.available, r(5, 1))
    fi:add(cf.shared, r(5, 1))
    fi:add(cf.unknown_flags, r(5, 1))
    fi:add(cf.codec, r(5, 1))
    t:add(cf.id_len, r(6, 1))
    local budget = r(7, 8):uint64()
    t:add(cf.budget, r(7, 8))
    local problem
    local version, flags = r(4, 1):uint(), r(5, 1):uint()
    if version ~= 1 then
        problem = string.format("unsupported chain protocol version %d", version)
        vi:add_proto_expert_info(cx.bad_hello, "Unsupported chain protocol version")
    elseif idlen == 0 then
        problem = "empty identity"
        t:add_proto_expert_info(cx.bad_hello, "Empty identity")
    end
    local id = ""
    if idlen > 0 then
        t:add(cf.id, r(15, idlen))
        id = r(15, idlen):string(ENC_UTF_8)
    end
    -- Unknown flags are a later build's offers: lb ignores them, and so does this summary.
    local flag_text = ((flags % 2 == 1) and " AVAILABLE" or "") .. ((math.floor(flags / 2) % 2 == 1) and " SHARED" or "")
    local codec = math.floor(flags / 16)
    if codec > 0 then
        flag_text = flag_text .. string.format(" codec %d", codec)
    end
    local summary = string.format("HELLO %s id %s budget %s%s", senders[sender], id, tostring(budget), flag_text)
    if problem then
        summary = summary .. " [refused: " .. problem .. "]"
        t:append_text(": [Malformed HELLO: " .. problem .. "]")
        return false, summary, r:len()
    end
    t:append_text(": " .. summary)
    return r:len(), summary
end

function lbchain.dissector(tvb, pinfo, tree)
    local total = tvb:len()
    if total == 0 then
        return 0
    end
    pinfo.cols.protocol = "LBCHAIN"
    if fresh_pass("lbchain", pinfo) then
        chains = {}
        frame_phase = {}
        info_texts = {}
    end
    local conv, dir = stream_keys(pinfo)
    local c = chains[conv]
    if not c then
        c = { downstream = dir, dirs = {} }
        chains[conv] = c
    end
    local d = c.dirs[dir]
    if not d then
        d = { phase = "hello" }
        c.dirs[dir] = d
    end
    local fkey = pinfo.number .. ":" .. position(tvb, 0)
    local phase
    if pinfo.visited then
        phase = frame_phase[fkey] or d.phase
    else
        phase = d.phase
        frame_phase[fkey] = phase
    end
    local sender = (dir == c.downstream) and 1 or 2
    local summaries = {}
    local offset = 0
    local function advance(p)
        phase = p
        if not pinfo.visited then
            d.phase = p
        end
    end
    while offset < total do
        if phase == "hello" then
            if tvb(offset, math.min(4, total - offset)):string() ~= string.sub("LBCH", 1, math.min(4, total - offset)) then
                local t = tree:add(lbchain, tvb(offset))
                t:add(cf.raw, tvb(offset))
                t:add_proto_expert_info(cx.no_hello)
                summaries[#summaries + 1] = "not a HELLO (" .. (total - offset) .. " bytes)"
                advance("raw")
                offset = total
                break
            end
            local len, info, bad = dissect_hello(tvb, pinfo, tree, offset, sender)
            if len == nil then
                if not desegment(pinfo, offset, info and info - (total - offset)) then
                    local t = tree:add(lbchain, tvb(offset))
                    t:add_proto_expert_info(cx.incomplete)
                    summaries[#summaries + 1] = "[incomplete HELLO]"
                end
                break
            end
            summaries[#summaries + 1] = info
            if len == false then
                -- An upstream relays a connection whose HELLO does not parse as plain bytes.
                advance("raw")
                offset = offset + bad
            else
                offset = offset + len
                advance(sender == 1 and "mode" or "await_mode")
            end
        elseif phase == "await_mode" then
            -- The upstream sends nothing after its HELLO before it has read the MODE.
            if c.mode == nil or c.mode_frame > pinfo.number then
                local t = tree:add(lbchain, tvb(offset))
                t:add(cf.undecoded, tvb(offset))
                t:add_proto_expert_info(cx.malformed, "Upstream bytes before the downstream's MODE")
                summaries[#summaries + 1] = "[bytes before MODE]"
                advance("broken")
                break
            end
            advance(c.mode == 2 and "raw" or "records")
        elseif phase == "mode" then
            local m = tvb(offset, 1):uint()
            local t = tree:add(lbchain, tvb(offset, 1))
            t:add(cf.sender, sender):set_generated()
            t:add(cf.mode, tvb(offset, 1))
            offset = offset + 1
            if not modes[m] then
                t:add_proto_expert_info(cx.malformed, string.format("Unknown MODE byte %d", m))
                summaries[#summaries + 1] = string.format("[Malformed: MODE %d]", m)
                advance("broken")
            else
                t:append_text(": MODE " .. modes[m])
                summaries[#summaries + 1] = "MODE " .. modes[m]
                if not pinfo.visited and c.mode == nil then
                    c.mode, c.mode_frame = m, pinfo.number
                end
                advance(m == 2 and "raw" or "records")
            end
        elseif phase == "records" then
            local ty = tvb(offset, 1):uint()
            if ty == 2 or ty == 3 then
                local t = tree:add(lbchain, tvb(offset, 1))
                t:add(cf.record_type, tvb(offset, 1))
                t:append_text(": " .. record_types[ty])
                summaries[#summaries + 1] = record_types[ty]
                offset = offset + 1
            elseif ty == 1 then
                local avail = total - offset
                if avail < 5 then
                    if not desegment(pinfo, offset, nil) then
                        summaries[#summaries + 1] = "[incomplete DATA]"
                    end
                    break
                end
                local n = tvb(offset + 1, 4):uint()
                if n == 0 or n > MAX_RECORD then
                    local t = tree:add(lbchain, tvb(offset))
                    t:add(cf.record_type, tvb(offset, 1))
                    t:add(cf.record_len, tvb(offset + 1, 4))
                    t:add(cf.undecoded, tvb(offset))
                    t:add_proto_expert_info(cx.malformed, string.format("DATA record length %d out of range", n))
                    summaries[#summaries + 1] = string.format("[Malformed: DATA length %d]", n)
                    advance("broken")
                    break
                end
                if avail < 5 + n then
                    if desegment(pinfo, offset, 5 + n - avail) then
                        break
                    end
                    local t = tree:add(lbchain, tvb(offset))
                    t:add(cf.record_type, tvb(offset, 1))
                    t:add(cf.record_len, tvb(offset + 1, 4))
                    t:add_proto_expert_info(cx.incomplete)
                    summaries[#summaries + 1] = "[incomplete DATA]"
                    break
                end
                local t = tree:add(lbchain, tvb(offset, 5 + n))
                t:add(cf.record_type, tvb(offset, 1))
                t:add(cf.record_len, tvb(offset + 1, 4))
                t:add(cf.record_data, tvb(offset + 5, n))
                t:append_text(string.format(": DATA %d bytes", n))
                summaries[#summaries + 1] = string.format("DATA %d", n)
                offset = offset + 5 + n
            else
                local t = tree:add(lbchain, tvb(offset))
                t:add(cf.record_type, tvb(offset, 1))
                t:add(cf.undecoded, tvb(offset))
                t:add_proto_expert_info(cx.malformed, string.format("Unknown record type %d", ty))
                summaries[#summaries + 1] = string.format("[Malformed: record type %d]", ty)
                advance("broken")
                break
            end
        elseif phase == "raw" then
            local t = tree:add(lbchain, tvb(offset))
            t:add(cf.raw, tvb(offset))
            summaries[#summaries + 1] = string.format("relayed %d bytes", total - offset)
            offset = total
        else -- broken: lb reset the connection; whatever follows is not parsed
            local t = tree:add(lbchain, tvb(offset))
            t:add(cf.undecoded, tvb(offset))
            summaries[#summaries + 1] = "[after a decode error]"
            break
        end
    end
    if #summaries > 0 then
        set_info(pinfo, table.concat(summaries, ", "))
    end
    return total
end

-- A chained connection starts with the downstream's HELLO: "LBCH" at the start of the stream.
local function heuristic(tvb, pinfo, tree)
    if tvb:len() < 4 or tvb(0, 4):string() ~= "LBCH" then
        return false
    end
    pinfo.conversation = lbchain
    lbchain.dissector(tvb, pinfo, tree)
    return true
end

lbchain:register_heuristic("tcp", heuristic)
tcp_port_table:add_for_decode_as(lbchain)
