-- pandoc filter for the man pages (`make man`): `pandoc -s -t man -L docs/manpage.lua`.
--
-- A div `::: {include="policy.md"}` is replaced by that Markdown file (its path
-- relative to the including page), without its title and with its headings
-- one level up, so a document of docs/ becomes the body of a man page and
-- stays the one text both are read from. Level-1 headings (man's .SH) are
-- upper-cased, as man pages write them, and tables become lists (see Table).

local function input_dir()
  local first = PANDOC_STATE.input_files[1]
  return (first and first:match("^(.*)/")) or "."
end

local function included(path)
  local file = assert(io.open(input_dir() .. "/" .. path, "r"))
  local text = file:read("a")
  file:close()
  local blocks = pandoc.read(text, "markdown-smart").blocks
  local out = {}
  local dropped_title = false
  for _, block in ipairs(blocks) do
    if block.t == "Header" and block.level == 1 and not dropped_title then
      dropped_title = true          -- the document's title: the man page has its own
    else
      if block.t == "Header" then
        block.level = math.max(1, block.level - 1)
      end
      table.insert(out, block)
    end
  end
  return out
end

local function upper(inlines)
  return pandoc.walk_inline(pandoc.Span(inlines), {
    Str = function(s) return pandoc.Str(pandoc.text.upper(s.text)) end,
  }).content
end

return {
  { Div = function(div)
      local path = div.attributes["include"]
      if path then return included(path) end
    end },
  { Header = function(h)
      if h.level == 1 then
        h.content = upper(h.content)
        return h
      end
    end,
    Table = function(t)
      -- A list, not a tbl table: tbl's fixed column widths make long texts
      -- run down narrow columns, and groff warns about tall cells. Each row
      -- becomes an entry: its first cell, then each other cell on a line of
      -- its own after its column's name ("default: 1024"); a two-column
      -- table (message | fix) needs no names.
      local names = {}
      for j, cell in ipairs(t.head.rows[1] and t.head.rows[1].cells or {}) do
        names[j] = pandoc.utils.stringify(cell.contents)
      end
      local items = {}
      for _, body in ipairs(t.bodies) do
        for _, row in ipairs(body.body) do
          local cells = row.cells
          local term = pandoc.utils.blocks_to_inlines(cells[1].contents)
          local lines = {}
          for j = 2, #cells do
            local text = pandoc.utils.blocks_to_inlines(cells[j].contents)
            if #text > 0 then
              if #lines > 0 then table.insert(lines, pandoc.RawInline("man", "\n.br\n")) end
              if #cells > 2 and (names[j] or "") ~= "" then
                table.insert(lines, pandoc.Emph({ pandoc.Str(names[j] .. ":") }))
                table.insert(lines, pandoc.Space())
              end
              for _, inline in ipairs(text) do table.insert(lines, inline) end
            end
          end
          table.insert(items, { term, { { pandoc.Para(lines) } } })
        end
      end
      return pandoc.DefinitionList(items)
    end },
}
